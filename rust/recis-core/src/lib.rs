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
pub mod omp;
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

/// Entry points of the fuzz targets (`fuzz/`), not an API: each runs a
/// reader path on arbitrary input and must return, never panic.
#[doc(hidden)]
pub mod fuzzing {
    /// The integer, boolean and compression decoders of the ORC reader on
    /// raw bytes (the first byte picks one).
    pub fn orc_decoders(data: &[u8]) -> usize {
        crate::orc_decode::fuzz(data)
    }

    /// Replaces libFuzzer's panic hook (which aborts on every panic, caught
    /// or not) with one that aborts only on a panic raised in RecIS's own
    /// code. Panics inside orc-rust or lzokay are caught by the reader and
    /// become data errors, by design; ours are bugs.
    pub fn abort_on_own_panics() {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if info.location().is_some_and(|l| l.file().contains("recis-core")) {
                    default(info);
                    std::process::abort();
                }
            }));
        });
    }
}
