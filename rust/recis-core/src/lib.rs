//! RecIS core: the pieces of sparse training that are not PyTorch — the
//! collisionless id → row hash table with admission and eviction, and fused
//! sparse optimizers, and the feature ops that turn raw values into ids.
//! Pure Rust: nothing here knows about Python.

pub mod admission;
mod batch;
pub mod ckpt;
mod column;
pub mod dedup;
pub mod features;
pub mod hash;
mod idmap;
pub mod init;
pub mod io;
pub mod optim;
mod orc_decode;
pub mod orc_guard;
pub mod pipeline;
mod policy;
pub mod pool;
mod rows;
pub mod store;
pub mod table;

pub use admission::AdmissionPolicy;
pub use init::Initializer;
pub use optim::SparseOptimizer;
pub use table::{
    EvictionPolicy, EvictionScore, HashTable, Missing, TableConfig, TableError, TableStats, UniqueLookup, NO_ROW,
};
