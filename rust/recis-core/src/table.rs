//! The host hash table: a collisionless map from any 64-bit id to a row of
//! `dim` embedding values followed by `slot_width` optimizer-slot values.
//!
//! Two levels, as in the original RecIS:
//! - an id map, split into shards by the high bits of a mixed hash of the id;
//!   each shard is an open-addressing table with linear probing over an array
//!   of atomic 64-bit keys and an array of atomic 32-bit row indices;
//! - row storage in segments that never move (`store.rs`), with per-row
//!   metadata (frequency, last step seen) beside it.
//!
//! Concurrency. The hot path (lookup, insert, gather) runs under a shared
//! lock on the table and is lock-free inside it: a new id takes a row from
//! an atomic counter or the free list, claims a key slot by compare-and-swap,
//! initialises the row, marks it live and publishes the row index; a reader
//! that finds the key before the index is published waits for it (bounded).
//! A batch is first reduced to its distinct ids per shard, with no lock
//! held; then shards are processed in parallel (rayon), so each task walks
//! one shard's memory and no two tasks of one call touch the same slot.
//! Capacity is reserved per shard for the distinct ids before inserting; a
//! shard that lacks room is grown under the exclusive lock, one shard at a
//! time (its own rehash only), which is the only pause growth causes.
//! Maintenance — optimizer updates, eviction, import, slot re-layout — takes
//! the exclusive lock, between steps. Who takes which lock, and when, is
//! `pipeline.rs`'s business: locks are taken at the top of a call, once per
//! table, never inside a rayon task (its module docs give the rules).
//!
//! Rows that callers name themselves (`gather`, `read_rows`) are checked to
//! be live (a state word in the row's metadata); rows of a lookup are used
//! under the guard that looked them up, or through a ticket whose epoch
//! proves no eviction came between.
//!
//! The key `u64::MAX` marks an empty slot; the one id equal to it lives in a
//! side slot, so every 64-bit id is a valid key.
//!
//! Namespaces. A table may hold several id spaces (`TableConfig::
//! namespace_seeds`): the embedding tables of several features that share a
//! configuration, coalesced into one table with one row store. Namespace `n`
//! owns its own run of id-map shards (`n * S .. (n + 1) * S`) and its own
//! side slot, so the same id in two namespaces is two keys — collisionless
//! at the full 64 bits, with no id bits given up for a prefix. Each
//! namespace has its own initializer seed; admission sees the id mixed with
//! a per-namespace salt. Rows, optimizer slots, eviction and the admission
//! sketch are the table's, shared by its namespaces.
//!
//! Layout. This file holds the table itself — `HashTable`, the state
//! behind its lock (`Inner`), its configuration, errors and stats — and
//! its public API. Each concern behind it has a module of its own:
//! - `idmap.rs`: the id map — shards, probing, claiming and publishing a
//!   key's row, waiting for a row being published, growth;
//! - `rows.rs`: the row store — row allocation and the free list, the
//!   metadata words and `LIVE` state, the raw reads and writes of rows;
//! - `batch.rs`: the batch machinery of `pipeline.rs` — prepared batches,
//!   reservation, lookup and insert, gradient grouping and the update;
//! - `policy.rs`: eviction, and the glue to admission (`admission.rs`).
//!
//! A public method that is all one concern lives in that concern's module
//! (`evict*` and the admission state in `policy.rs`, `set_slots` and
//! `read_rows` in `rows.rs`); the others are here.

use crate::admission::{Admission, AdmissionPolicy};
use crate::batch::GradRows;
use crate::hash::mix64;
use crate::idmap::{Shard, EMPTY, LOOKUP_CHUNK};
use crate::init::Initializer;
use crate::optim::SparseOptimizer;
use crate::rows::{LIVE, META_WIDTH, STATE};
use crate::store::Segmented;
use rayon::prelude::*;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use crate::policy::{EvictionPolicy, EvictionScore};

/// Row index of an id that has no row (not admitted, or absent on lookup).
pub const NO_ROW: u32 = u32::MAX;

/// Rows per table (per process); row indices are `u32` to keep the id map at
/// 12 bytes a slot.
pub const MAX_ROWS: u64 = (u32::MAX - 2) as u64;

/// Ids of tables, for tickets: never reused within a process.
static NEXT_TABLE_UID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, PartialEq)]
pub enum TableError {
    /// An argument is malformed; the message names it.
    InvalidArgument(String),
    /// The table has used every row index.
    Full,
    /// A row another call was inserting was not published in time (that
    /// call died mid-insert); the message names the id.
    Stalled(String),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::InvalidArgument(m) => write!(f, "{m}"),
            TableError::Full => write!(f, "hash table is full: it holds {MAX_ROWS} rows, the most a table can hold"),
            TableError::Stalled(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for TableError {}

pub(crate) type Result<T> = std::result::Result<T, TableError>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(TableError::InvalidArgument(msg.into()))
}

#[derive(Clone, Debug)]
pub struct TableConfig {
    pub dim: usize,
    pub initializer: Initializer,
    /// Seed of the initial values and of probabilistic admission.
    pub seed: u64,
    pub admission: AdmissionPolicy,
    /// Number of id-map shards (rounded up to a power of two).
    pub num_shards: usize,
    /// Expected number of ids; the id map starts at this capacity.
    pub initial_capacity: usize,
    /// Rows in the first storage segment (rounded up to a power of two).
    pub first_segment_rows: usize,
    /// One initializer seed per namespace; empty: one namespace seeded by
    /// `seed`. Each namespace gets `num_shards / namespaces` id-map shards
    /// (at least 16, at most `num_shards`).
    pub namespace_seeds: Vec<u64>,
}

impl TableConfig {
    pub fn new(dim: usize) -> Self {
        TableConfig {
            dim,
            initializer: Initializer::Uniform { low: -0.05, high: 0.05 },
            seed: 0,
            admission: AdmissionPolicy::Always,
            num_shards: 256,
            initial_capacity: 1 << 14,
            first_segment_rows: 1 << 12,
            namespace_seeds: Vec::new(),
        }
    }
}

/// How a read of an id without a row is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Missing {
    Zeros,
    /// The id's would-be initial value.
    Initial,
}

/// A batch of ids reduced to its distinct ids.
#[derive(Debug, Default, Clone)]
pub struct UniqueLookup {
    /// The distinct ids, in an unspecified (shard) order.
    pub ids: Vec<u64>,
    /// Row of each distinct id, `NO_ROW` where it has none.
    pub rows: Vec<u32>,
    /// For each input position, the index of its id in `ids`.
    pub inverse: Vec<u32>,
    /// How often each distinct id occurs in the batch.
    pub counts: Vec<u32>,
}

/// Size and memory of a table. Byte counts are of memory in use: the id map
/// (every slot is written when it is created), and rows and their metadata up
/// to the highest row handed out. `reserved_bytes` is the virtual size of the
/// row segments, whose untouched tail costs address space, not memory.
#[derive(Debug, Clone, PartialEq)]
pub struct TableStats {
    pub len: usize,
    pub id_map_slots: usize,
    pub rows_allocated: usize,
    pub free_rows: usize,
    pub id_map_bytes: usize,
    pub row_bytes: usize,
    pub meta_bytes: usize,
    pub other_bytes: usize,
    pub reserved_bytes: usize,
}

impl TableStats {
    pub fn total_bytes(&self) -> usize {
        self.id_map_bytes + self.row_bytes + self.meta_bytes + self.other_bytes
    }

    /// Bytes per stored id beyond the row itself (embedding and slots): the
    /// cost of the table as a data structure.
    pub fn overhead_bytes_per_id(&self) -> f64 {
        (self.id_map_bytes + self.meta_bytes + self.other_bytes) as f64 / self.len.max(1) as f64
    }
}

/// A row exported from the table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMeta {
    pub frequency: u32,
    pub last_step: u32,
}

/// The state behind a table's lock: the id map (`idmap.rs`) and the row
/// store (`rows.rs`).
pub(crate) struct Inner {
    /// Namespace `n`'s shards are `shards[n * ns_shards..(n + 1) * ns_shards]`.
    pub(crate) shards: Vec<Shard>,
    pub(crate) ns_shards: usize,
    pub(crate) shard_shift: u32,
    /// Row of the id `u64::MAX` of each namespace (`NO_ROW` if absent,
    /// `PENDING` while being inserted).
    pub(crate) sentinel_rows: Box<[AtomicU32]>,
    pub(crate) values: Segmented<f32>,
    pub(crate) meta: Segmented<AtomicU32>,
    pub(crate) slot_width: usize,
    pub(crate) slot_init: f32,
    pub(crate) next_row: AtomicU64,
    /// Free rows; `free[..free_top]` are available. Pops happen under the
    /// shared lock (CAS on `free_top`), pushes only under the exclusive lock,
    /// so there is no ABA.
    pub(crate) free: Vec<u32>,
    pub(crate) free_top: AtomicUsize,
    /// Rows allocated in bulk but not used (a racing call inserted the same
    /// id first); moved to `free` by the next exclusive operation. A lock,
    /// but only on that rare path.
    pub(crate) spare: Mutex<Vec<u32>>,
    /// Bumped by every exclusive operation that frees or replaces rows
    /// (eviction, clear): a ticket's rows are live while it matches.
    pub(crate) epoch: u64,
    /// One bit a row, all clear between calls: the exclusive update's check
    /// that its target rows are distinct (`rows.rs`, `update_rows`).
    pub(crate) seen: Vec<u64>,
}

/// See the module docs. Its methods lock the table at their top: call them
/// (or `pipeline`'s functions, for several batches at once) from plain
/// threads, never from inside rayon tasks that work on the same table.
pub struct HashTable {
    pub(crate) cfg: TableConfig,
    /// Initializer seed of each namespace.
    pub(crate) seeds: Vec<u64>,
    /// What admission sees of namespace `n`'s id: `id ^ salts[n]` (0 for
    /// namespace 0, so a one-namespace table admits exactly as before).
    pub(crate) salts: Vec<u64>,
    pub(crate) admission: Admission,
    /// Identity for tickets, unique in the process.
    uid: u64,
    /// Id-map shards per namespace, and the shift that picks one from a
    /// hash: fixed for the table's life (growth rehashes within a shard).
    pub(crate) ns_shards: usize,
    pub(crate) shard_shift: u32,
    inner: RwLock<Inner>,
}

impl HashTable {
    pub fn new(cfg: TableConfig) -> Result<Self> {
        if cfg.dim == 0 {
            return invalid("dim must be >= 1");
        }
        cfg.initializer.validate().map_err(TableError::InvalidArgument)?;
        cfg.admission.validate().map_err(TableError::InvalidArgument)?;
        let seeds = if cfg.namespace_seeds.is_empty() { vec![cfg.seed] } else { cfg.namespace_seeds.clone() };
        let namespaces = seeds.len();
        if namespaces > 1 << 16 {
            return invalid(format!("a table holds at most {} namespaces, got {namespaces}", 1 << 16));
        }
        let salts = (0..namespaces as u64).map(|n| if n == 0 { 0 } else { mix64(n ^ 0x5bd1_e995_9e37_79b9) }).collect();
        let per_ns = cfg.num_shards.clamp(1, 1 << 16).next_power_of_two();
        let per_ns =
            if namespaces > 1 { (per_ns / namespaces).max(16).next_power_of_two().min(per_ns) } else { per_ns };
        let num_shards = per_ns * namespaces;
        let per_shard = (cfg.initial_capacity / num_shards).max(8);
        let shards = (0..num_shards)
            .map(|i| {
                // Load factors spread over [0.6, 0.8) so shards cross their
                // thresholds at different sizes and growth is spread over
                // many batches instead of all shards doubling at once.
                let lf = 0.6 + 0.2 * (mix64(i as u64) >> 11) as f64 / (1u64 << 53) as f64;
                Shard::with_capacity((per_shard as f64 / lf) as usize + 1, lf)
            })
            .collect();
        let shard_shift = 64 - per_ns.trailing_zeros();
        let admission = Admission::new(cfg.admission.clone(), cfg.seed);
        let inner = Inner {
            shards,
            ns_shards: per_ns,
            shard_shift,
            sentinel_rows: (0..namespaces).map(|_| AtomicU32::new(NO_ROW)).collect(),
            values: Segmented::new(cfg.dim, cfg.first_segment_rows),
            meta: Segmented::new(META_WIDTH, cfg.first_segment_rows),
            slot_width: 0,
            slot_init: 0.0,
            next_row: AtomicU64::new(0),
            free: Vec::new(),
            free_top: AtomicUsize::new(0),
            spare: Mutex::new(Vec::new()),
            epoch: 0,
            seen: Vec::new(),
        };
        let uid = NEXT_TABLE_UID.fetch_add(1, Ordering::Relaxed);
        Ok(HashTable { cfg, seeds, salts, admission, uid, ns_shards: per_ns, shard_shift, inner: RwLock::new(inner) })
    }

    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    pub fn dim(&self) -> usize {
        self.cfg.dim
    }

    /// Number of namespaces (id spaces) of the table.
    pub fn namespaces(&self) -> usize {
        self.seeds.len()
    }

    pub(crate) fn check_ns(&self, ns: usize) -> Result<()> {
        if ns >= self.seeds.len() {
            return invalid(format!("namespace {ns} is out of range: the table has {}", self.seeds.len()));
        }
        Ok(())
    }

    pub fn slot_width(&self) -> usize {
        self.read().slot_width
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way later calls could observe differently from a lost batch.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of ids stored.
    pub fn len(&self) -> usize {
        let inner = self.read();
        inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of ids stored in namespace `ns`.
    pub fn len_in(&self, ns: usize) -> Result<usize> {
        self.check_ns(ns)?;
        let inner = self.read();
        let s = inner.ns_shards;
        let sentinel = inner.sentinel_rows[ns].load(Ordering::Acquire) != NO_ROW;
        Ok(inner.shards[ns * s..(ns + 1) * s].iter().map(|s| s.len.load(Ordering::Acquire)).sum::<usize>()
            + sentinel as usize)
    }

    pub fn stats(&self) -> TableStats {
        let inner = self.read();
        let slots: usize = inner.shards.iter().map(|s| s.capacity()).sum();
        let free_rows = inner.free_top.load(Ordering::Acquire);
        let rows = inner.next_row.load(Ordering::Acquire).min(MAX_ROWS) as usize;
        TableStats {
            len: inner.len(),
            id_map_slots: slots,
            rows_allocated: rows,
            free_rows,
            id_map_bytes: slots * (8 + 4),
            row_bytes: rows * inner.values.width() * 4,
            meta_bytes: rows * META_WIDTH * 4,
            other_bytes: self.admission.memory_bytes()
                + inner.free.capacity() * 4
                + inner.shards.len() * std::mem::size_of::<Shard>(),
            reserved_bytes: inner.values.allocated_bytes() + inner.meta.allocated_bytes(),
        }
    }

    /// Looks up a batch of ids, inserting those that are new (subject to
    /// admission), and reduces it to its distinct ids. `step` is recorded as
    /// the ids' last-seen step and their frequency grows by their count in
    /// the batch.
    pub fn lookup_or_insert_unique(&self, ids: &[u64], step: u64) -> Result<UniqueLookup> {
        self.lookup_or_insert_unique_in(0, ids, step)
    }

    /// Read-only lookup of a batch reduced to distinct ids: inserts nothing
    /// and touches no metadata (evaluation).
    pub fn lookup_unique(&self, ids: &[u64]) -> Result<UniqueLookup> {
        self.lookup_unique_in(0, ids)
    }

    /// [`lookup_or_insert_unique`](Self::lookup_or_insert_unique) of ids of namespace `ns`.
    pub fn lookup_or_insert_unique_in(&self, ns: usize, ids: &[u64], step: u64) -> Result<UniqueLookup> {
        let req = crate::pipeline::Request::new(self, ns, ids).insert(step);
        Ok(crate::pipeline::lookup_many(&[req])?.pop().expect("one request, one result"))
    }

    /// [`lookup_unique`](Self::lookup_unique) of ids of namespace `ns`.
    pub fn lookup_unique_in(&self, ns: usize, ids: &[u64]) -> Result<UniqueLookup> {
        let req = crate::pipeline::Request::new(self, ns, ids);
        Ok(crate::pipeline::lookup_many(&[req])?.pop().expect("one request, one result"))
    }

    /// Per-position rows of a batch, inserting new ids (see
    /// [`lookup_or_insert_unique`](Self::lookup_or_insert_unique)).
    pub fn lookup_or_insert(&self, ids: &[u64], step: u64) -> Result<Vec<u32>> {
        let u = self.lookup_or_insert_unique(ids, step)?;
        Ok(u.inverse.iter().map(|&i| u.rows[i as usize]).collect())
    }

    /// Per-position rows, `NO_ROW` for absent ids. Inserts nothing.
    pub fn lookup(&self, ids: &[u64]) -> Result<Vec<u32>> {
        self.lookup_in(0, ids)
    }

    /// [`lookup`](Self::lookup) of ids of namespace `ns`.
    pub fn lookup_in(&self, ns: usize, ids: &[u64]) -> Result<Vec<u32>> {
        self.check_ns(ns)?;
        let inner = self.read();
        let mut out = vec![NO_ROW; ids.len()];
        out.par_chunks_mut(LOOKUP_CHUNK)
            .zip(ids.par_chunks(LOOKUP_CHUNK))
            .try_for_each(|(o, c)| inner.find_many(ns, c, o))?;
        Ok(out)
    }

    /// A stable identity of the table (tickets name it).
    pub(crate) fn uid(&self) -> u64 {
        self.uid
    }

    pub(crate) fn read_guard(&self) -> RwLockReadGuard<'_, Inner> {
        self.read()
    }

    pub(crate) fn write_guard(&self) -> RwLockWriteGuard<'_, Inner> {
        self.write()
    }

    /// The would-be initial embedding of each id (what an id reads as before
    /// it has a row).
    pub fn initial_values(&self, ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.initial_values_in(0, ids, out)
    }

    /// [`initial_values`](Self::initial_values) of ids of namespace `ns`.
    pub fn initial_values_in(&self, ns: usize, ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.check_ns(ns)?;
        let seed = self.seeds[ns];
        let d = self.cfg.dim;
        if out.len() != ids.len() * d {
            return invalid(format!(
                "out: expected {} values ({} ids x dim {d}), got {}",
                ids.len() * d,
                ids.len(),
                out.len()
            ));
        }
        out.par_chunks_mut(d).zip(ids.par_iter()).with_min_len(256).for_each(|(o, &id)| {
            self.cfg.initializer.fill(seed, id, o);
        });
        Ok(())
    }

    /// Copies the embeddings of `rows` into `out` (`len(rows) x dim`). A row
    /// equal to `NO_ROW` reads per `missing`, using the matching id.
    pub fn gather(&self, ids: &[u64], rows: &[u32], missing: Missing, out: &mut [f32]) -> Result<()> {
        self.gather_in(0, ids, rows, missing, out)
    }

    /// [`gather`](Self::gather) of ids of namespace `ns` (whose seed gives
    /// the initial values of missing rows).
    pub fn gather_in(&self, ns: usize, ids: &[u64], rows: &[u32], missing: Missing, out: &mut [f32]) -> Result<()> {
        self.check_ns(ns)?;
        let d = self.cfg.dim;
        if ids.len() != rows.len() {
            return invalid(format!("ids and rows differ in length: {} vs {}", ids.len(), rows.len()));
        }
        if out.len() != rows.len() * d {
            return invalid(format!(
                "out: expected {} values ({} rows x dim {d}), got {}",
                rows.len() * d,
                rows.len(),
                out.len()
            ));
        }
        let inner = self.read();
        inner.check_live(rows, "rows", true)?;
        self.gather_live(&inner, ns, ids, rows, missing, out);
        Ok(())
    }

    /// Applies one optimizer step to the rows given. Gradients of the same
    /// row are summed first; `NO_ROW` entries (not admitted ids) are skipped.
    /// Non-finite gradients are refused before anything changes.
    pub fn apply_gradients(
        &self,
        rows: &[u32],
        grads: &[f32],
        opt: &SparseOptimizer,
        lr: f32,
        step: u64,
    ) -> Result<()> {
        let index: Vec<u32> = (0..rows.len() as u32).collect();
        self.apply_gradients_indexed(rows, &index, grads, opt, lr, step)
    }

    /// Optimizer step with gradients given per lookup position: `grads[k]`
    /// belongs to row `rows[index[k]]` (the layout of a sparse gradient of a
    /// block of looked-up rows). Rows may repeat: gradients of the same row
    /// are summed before the update (grouped by sorting on the row).
    /// [`crate::pipeline::apply_many`] with tickets takes the linear path.
    pub fn apply_gradients_indexed(
        &self,
        rows: &[u32],
        index: &[u32],
        grads: &[f32],
        opt: &SparseOptimizer,
        lr: f32,
        step: u64,
    ) -> Result<()> {
        let mut inner = self.write();
        self.apply_locked(&mut inner, GradRows::Any(rows), index, grads, opt, lr, step)
    }

    /// A snapshot of every (id, row) pair. Read the rows with
    /// [`read_rows`](Self::read_rows) before the next maintenance call.
    pub fn export_keys(&self) -> (Vec<u64>, Vec<u32>) {
        let inner = self.read();
        inner.entries().into_iter().map(|(_, id, r)| (id, r)).unzip()
    }

    /// [`export_keys`](Self::export_keys) with each id's namespace; the
    /// entries come namespace by namespace.
    pub fn export_entries(&self) -> (Vec<u64>, Vec<u32>, Vec<u32>) {
        let inner = self.read();
        let all = inner.entries();
        let mut ids = Vec::with_capacity(all.len());
        let mut rows = Vec::with_capacity(all.len());
        let mut nss = Vec::with_capacity(all.len());
        for (ns, id, r) in all {
            ids.push(id);
            rows.push(r);
            nss.push(ns);
        }
        (ids, rows, nss)
    }

    /// Inserts or overwrites full rows (embedding and slots) with their
    /// metadata, bypassing admission: the inverse of export. Exclusive.
    pub fn import(&self, ids: &[u64], values: &[f32], frequency: &[u32], last_step: &[u32]) -> Result<()> {
        self.import_in(0, ids, values, frequency, last_step)
    }

    /// [`import`](Self::import) into namespace `ns`.
    pub fn import_in(
        &self,
        ns: usize,
        ids: &[u64],
        values: &[f32],
        frequency: &[u32],
        last_step: &[u32],
    ) -> Result<()> {
        self.check_ns(ns)?;
        // The width is read under the same exclusive guard that writes.
        let mut inner = self.write();
        let w = self.cfg.dim + inner.slot_width;
        if values.len() != ids.len() * w {
            return invalid(format!(
                "import: values hold {} floats, expected {} ids x width {w} (dim {} + {} slot values)",
                values.len(),
                ids.len(),
                self.cfg.dim,
                inner.slot_width
            ));
        }
        if frequency.len() != ids.len() || last_step.len() != ids.len() {
            return invalid(format!(
                "import: {} ids but {} frequencies and {} last steps",
                ids.len(),
                frequency.len(),
                last_step.len()
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        if let Some(dup) = ids.iter().find(|&&id| !seen.insert(id)) {
            return invalid(format!("import: id {dup} occurs twice"));
        }
        for (k, &id) in ids.iter().enumerate() {
            let row = match inner.find(ns, id)? {
                r if r != NO_ROW => r,
                _ => {
                    let row = inner.alloc_row().ok_or(TableError::Full)?;
                    if id == EMPTY {
                        *inner.sentinel_rows[ns].get_mut() = row;
                    } else {
                        let s = inner.shard_of(ns, mix64(id));
                        let shard = &mut inner.shards[s];
                        if *shard.len.get_mut() + 1 > shard.max_load {
                            let want = *shard.len.get_mut() + 1;
                            shard.rebuild(want, |_, _| true);
                        }
                        shard.insert_new(id, row);
                        *shard.reserved.get_mut() += 1;
                    }
                    row
                }
            };
            inner.values_mut(row).copy_from_slice(&values[k * w..(k + 1) * w]);
            let m = inner.meta_words(row);
            m[0].store(frequency[k], Ordering::Relaxed);
            m[1].store(last_step[k], Ordering::Relaxed);
            m[STATE].store(LIVE, Ordering::Release);
        }
        Ok(())
    }

    /// Removes every id. Exclusive.
    pub fn clear(&self) {
        let mut inner = self.write();
        for shard in inner.shards.iter_mut() {
            shard.rebuild(0, |_, _| false);
        }
        for sentinel in inner.sentinel_rows.iter_mut() {
            *sentinel.get_mut() = NO_ROW;
        }
        *inner.next_row.get_mut() = 0;
        // Fresh stores: no reused row keeps a stale LIVE state.
        let width = inner.values.width();
        inner.values = Segmented::new(width, self.cfg.first_segment_rows);
        inner.meta = Segmented::new(META_WIDTH, self.cfg.first_segment_rows);
        inner.epoch += 1;
        inner.free.clear();
        *inner.free_top.get_mut() = 0;
        inner.spare.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Inner {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Position of the first element meeting `bad`, or None. The common case —
/// nothing bad — is a branch-free scan of large chunks in parallel, which the
/// compiler vectorises; only a chunk that has a bad element is searched again.
pub(crate) fn first_where<T: Sync>(xs: &[T], bad: impl Fn(&T) -> bool + Sync) -> Option<usize> {
    const CHUNK: usize = 1 << 14;
    let any_bad = |c: &[T]| c.iter().fold(false, |acc, x| acc | bad(x));
    if !xs.par_chunks(CHUNK).any(any_bad) {
        return None;
    }
    xs.iter().position(&bad)
}
