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

use crate::admission::{Admission, AdmissionPolicy};
use crate::hash::mix64;
use crate::init::Initializer;
use crate::optim::SparseOptimizer;
use crate::store::Segmented;
use rayon::prelude::*;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Row index of an id that has no row (not admitted, or absent on lookup).
pub const NO_ROW: u32 = u32::MAX;
/// Row index of a slot whose key is claimed but whose row is not yet published.
const PENDING: u32 = u32::MAX - 1;
/// Rows per table (per process); row indices are `u32` to keep the id map at
/// 12 bytes a slot.
pub const MAX_ROWS: u64 = (u32::MAX - 2) as u64;
const EMPTY: u64 = u64::MAX;
/// Slot position of an id not in the id map.
const ABSENT: usize = usize::MAX;
/// Ids probed together by `lookup`, their misses overlapping.
const LOOKUP_CHUNK: usize = 64;
/// A (namespace, id, row) entry of the id map.
type NsEntry = (u32, u64, u32);
/// Metadata words per row: frequency, last step seen (low 32 bits), state.
const META_WIDTH: usize = 3;
/// Index of the state word in a row's metadata.
const STATE: usize = 2;
/// State bit of a row that holds a published id: set (release) once the row
/// is initialised, cleared when the row is evicted. Only live rows are read
/// by callers that name rows themselves.
const LIVE: u32 = 1;
/// How long a reader waits for a row another thread is inserting before it
/// reports the id as stalled (an inserting thread that died mid-insert).
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
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

type Result<T> = std::result::Result<T, TableError>;

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
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

/// What eviction removes. Every set criterion applies (an id meeting any of
/// them is evicted); then, if `max_rows` is set and more rows remain, the
/// lowest-scored rows go until `max_rows` remain.
#[derive(Clone, Debug, Default)]
pub struct EvictionPolicy {
    /// Evict ids not seen for more than this many steps.
    pub ttl_steps: Option<u64>,
    /// Evict ids seen fewer than this many times.
    pub min_frequency: Option<u32>,
    /// Keep at most this many rows, by the score below.
    pub max_rows: Option<usize>,
    pub score: EvictionScore,
    /// Evict rows whose embedding's L2 norm is below this.
    pub min_l2_norm: Option<f32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum EvictionScore {
    /// Least recently seen go first.
    #[default]
    Lru,
    /// Least frequently seen go first (ties: least recently seen).
    Lfu,
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

struct Shard {
    keys: Box<[AtomicU64]>,
    rows: Box<[AtomicU32]>,
    mask: usize,
    /// Slots in use.
    len: AtomicUsize,
    /// Slots in use plus those reserved by batches in flight; never above
    /// `max_load`, so probing always ends at an empty slot.
    reserved: AtomicUsize,
    max_load: usize,
    /// This shard's load factor. Shards differ slightly so that they do not
    /// all double in the same batch.
    load_factor: f64,
}

impl Shard {
    fn with_capacity(cap: usize, load_factor: f64) -> Self {
        let cap = cap.max(8).next_power_of_two();
        Shard {
            keys: (0..cap).map(|_| AtomicU64::new(EMPTY)).collect(),
            rows: (0..cap).map(|_| AtomicU32::new(PENDING)).collect(),
            mask: cap - 1,
            len: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            max_load: ((cap as f64) * load_factor) as usize,
            load_factor,
        }
    }

    fn capacity(&self) -> usize {
        self.mask + 1
    }

    #[inline]
    fn home(&self, h: u64) -> usize {
        h as usize & self.mask
    }

    /// The row published in `slot`, waiting (bounded) while another call
    /// is inserting it.
    #[inline]
    fn wait_row(&self, slot: usize) -> Result<u32> {
        let r = self.rows[slot].load(Ordering::Acquire);
        if r != PENDING {
            return Ok(r);
        }
        wait_published(&self.rows[slot], || format!("id {}", self.keys[slot].load(Ordering::Relaxed)))
    }

    fn find(&self, key: u64, h: u64) -> Result<Option<u32>> {
        self.find_slot(key, h).map(|i| self.wait_row(i)).transpose()
    }

    /// The slot holding `key`, without waiting for its row.
    #[inline]
    fn find_slot(&self, key: u64, h: u64) -> Option<usize> {
        let mut i = self.home(h);
        loop {
            let k = self.keys[i].load(Ordering::Acquire);
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Finds `key` or claims an empty slot for it. Capacity must have been
    /// reserved by the caller.
    /// Finds `key`'s slot or claims an empty one for it; never waits for a
    /// row to be published (the caller does, once its own claims are).
    fn find_or_claim(&self, key: u64, h: u64) -> Probe {
        let mut i = self.home(h);
        loop {
            let k = self.keys[i].load(Ordering::Acquire);
            if k == key {
                return Probe::Found(i);
            }
            if k == EMPTY {
                match self.keys[i].compare_exchange(EMPTY, key, Ordering::AcqRel, Ordering::Acquire) {
                    // The caller adds the batch's claims to `len` at once.
                    Ok(_) => return Probe::Claimed(i),
                    Err(now) if now == key => return Probe::Found(i),
                    Err(_) => {}
                }
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The row in `slot` if already published.
    fn published(&self, slot: usize) -> Option<u32> {
        let r = self.rows[slot].load(Ordering::Acquire);
        (r != PENDING).then_some(r)
    }

    /// Inserts a key known to be absent, under exclusive access.
    fn insert_new(&mut self, key: u64, row: u32) {
        let mut i = self.home(mix64(key));
        while *self.keys[i].get_mut() != EMPTY {
            i = (i + 1) & self.mask;
        }
        *self.keys[i].get_mut() = key;
        *self.rows[i].get_mut() = row;
        *self.len.get_mut() += 1;
    }

    /// Live (key, row) pairs.
    fn entries(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.keys.iter().zip(self.rows.iter()).filter_map(|(k, r)| {
            let k = k.load(Ordering::Acquire);
            let r = r.load(Ordering::Acquire);
            (k != EMPTY && r < PENDING).then_some((k, r))
        })
    }

    /// Rebuilds the shard with room for `min_len` keys, keeping only the
    /// entries `keep` accepts. Exclusive access.
    fn rebuild(&mut self, min_len: usize, mut keep: impl FnMut(u64, u32) -> bool) {
        let live: Vec<(u64, u32)> = self.entries().filter(|&(k, r)| keep(k, r)).collect();
        let need = min_len.max(live.len());
        let mut cap = self.capacity();
        while (cap as f64 * self.load_factor) as usize <= need {
            cap *= 2;
        }
        // Shrink when a quarter full or less (after eviction).
        while cap > 8 && ((cap / 2) as f64 * self.load_factor) as usize > need * 2 {
            cap /= 2;
        }
        let mut fresh = Shard::with_capacity(cap, self.load_factor);
        for (k, r) in live {
            fresh.insert_new(k, r);
        }
        *fresh.reserved.get_mut() = *fresh.len.get_mut();
        *self = fresh;
    }
}

enum Probe {
    /// The key's slot (its row may still be pending).
    Found(usize),
    Claimed(usize),
}

enum Claim {
    Found(u32),
    NotAdmitted,
    New {
        slot: usize,
        row: u32,
    },
    /// Another call claimed the key and has not published its row yet: it
    /// is read (and touched, if `touch`) once this task's own claims are
    /// published, so no task waits while others wait on its claims.
    Later {
        slot: usize,
        touch: bool,
    },
    Full,
}

pub(crate) struct Inner {
    /// Namespace `n`'s shards are `shards[n * ns_shards..(n + 1) * ns_shards]`.
    shards: Vec<Shard>,
    ns_shards: usize,
    shard_shift: u32,
    /// Row of the id `u64::MAX` of each namespace (`NO_ROW` if absent,
    /// `PENDING` while being inserted).
    sentinel_rows: Box<[AtomicU32]>,
    values: Segmented<f32>,
    meta: Segmented<AtomicU32>,
    slot_width: usize,
    slot_init: f32,
    next_row: AtomicU64,
    /// Free rows; `free[..free_top]` are available. Pops happen under the
    /// shared lock (CAS on `free_top`), pushes only under the exclusive lock,
    /// so there is no ABA.
    free: Vec<u32>,
    free_top: AtomicUsize,
    /// Rows allocated in bulk but not used (a racing call inserted the same
    /// id first); moved to `free` by the next exclusive operation. A lock,
    /// but only on that rare path.
    spare: Mutex<Vec<u32>>,
    /// Bumped by every exclusive operation that frees or replaces rows
    /// (eviction, clear): a ticket's rows are live while it matches.
    epoch: u64,
}

/// See the module docs. Its methods lock the table at their top: call them
/// (or `pipeline`'s functions, for several batches at once) from plain
/// threads, never from inside rayon tasks that work on the same table.
pub struct HashTable {
    cfg: TableConfig,
    /// Initializer seed of each namespace.
    seeds: Vec<u64>,
    /// What admission sees of namespace `n`'s id: `id ^ salts[n]` (0 for
    /// namespace 0, so a one-namespace table admits exactly as before).
    salts: Vec<u64>,
    admission: Admission,
    /// Identity for tickets, unique in the process.
    uid: u64,
    /// Id-map shards per namespace, and the shift that picks one from a
    /// hash: fixed for the table's life (growth rehashes within a shard).
    ns_shards: usize,
    shard_shift: u32,
    inner: RwLock<Inner>,
}

/// A raw pointer that may cross threads. Every use states why the rows it
/// reaches are not touched by another thread at the same time.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: see each use site.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: see each use site.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// A method (not field access) so that closures capture the whole
    /// wrapper, which is Send, rather than the bare pointer field.
    #[inline(always)]
    fn get(self) -> *mut T {
        self.0
    }
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

    fn check_ns(&self, ns: usize) -> Result<()> {
        if ns >= self.seeds.len() {
            return invalid(format!("namespace {ns} is out of range: the table has {}", self.seeds.len()));
        }
        Ok(())
    }

    /// What admission counts for `id` of namespace `ns`.
    #[inline]
    fn admission_key(&self, ns: usize, id: u64) -> u64 {
        id ^ self.salts[ns]
    }

    pub fn slot_width(&self) -> usize {
        self.read().slot_width
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way later calls could observe differently from a lost batch.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
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

    /// Partitions a batch of namespace `ns` by shard and reduces each
    /// shard's part to its distinct ids. Takes no lock: it reads only `ids`.
    pub(crate) fn prepare(&self, ns: usize, ids: &[u64]) -> Result<Prepared> {
        self.check_ns(ns)?;
        if ids.len() > u32::MAX as usize {
            return invalid(format!("ids: a batch holds at most {} ids, got {}", u32::MAX, ids.len()));
        }
        // The shard count of a namespace is fixed for the table's life.
        let (num_shards, shard_shift) = (self.ns_shards, self.shard_shift);
        let part = Partition::new(ids, num_shards, shard_shift);
        let mut local_idx = vec![0u32; ids.len()];
        let local_ptr = SendPtr(local_idx.as_mut_ptr());
        let shards: Vec<ShardIds> = (0..num_shards)
            .into_par_iter()
            .with_min_len(4)
            .map(|s| {
                let positions = &part.perm[part.offsets[s]..part.offsets[s + 1]];
                let mut out = ShardIds::default();
                if positions.is_empty() {
                    return out;
                }
                // Dedup with a small open-addressing map local to this task.
                let cap = (positions.len() * 2).next_power_of_two();
                let mask = cap - 1;
                let mut slots: Vec<u32> = vec![u32::MAX; cap];
                for &p in positions {
                    let id = ids[p as usize];
                    let h = part.hashes[p as usize];
                    let mut i = (h >> 24) as usize & mask;
                    let li = loop {
                        let u = slots[i];
                        if u == u32::MAX {
                            slots[i] = out.ids.len() as u32;
                            out.ids.push(id);
                            out.hashes.push(h);
                            out.counts.push(0);
                            break out.ids.len() as u32 - 1;
                        }
                        if out.ids[u as usize] == id {
                            break u;
                        }
                        i = (i + 1) & mask;
                    };
                    out.counts[li as usize] += 1;
                    // SAFETY: `local_idx` has one element per input position
                    // and each position belongs to exactly one shard, so no
                    // two tasks write the same element; it outlives the loop.
                    unsafe { *local_ptr.get().add(p as usize) = li };
                }
                out
            })
            .collect();
        Ok(Prepared { ns, part, shards, local_idx })
    }

    /// Reserves id-map room for the distinct ids of `prep` (an insert). On
    /// failure nothing stays reserved and the shards short of room are
    /// returned with the keys they must fit.
    pub(crate) fn reserve(&self, inner: &Inner, prep: &Prepared) -> std::result::Result<(), Vec<(usize, usize)>> {
        inner.reserve(prep.ns * inner.ns_shards, &prep.shards)
    }

    /// (shard, distinct ids) of every shard `prep` inserts into: what a
    /// grow must make room for.
    pub(crate) fn needs(&self, prep: &Prepared) -> Vec<(usize, usize)> {
        let base = prep.ns * self.ns_shards;
        prep.shards
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.ids.is_empty())
            .map(|(s, d)| (base + s, d.ids.len()))
            .collect()
    }

    pub(crate) fn unreserve(&self, inner: &Inner, prep: &Prepared, out: &BatchOut) {
        inner.unreserve(prep.ns * inner.ns_shards, &prep.shards, &out.inserted);
    }

    /// Decays the admission counts if `step` is due for it. Takes the
    /// exclusive lock: call it holding no guard of this table.
    pub(crate) fn decay_admission(&self, step: u64) {
        if self.admission.decay_due(step) {
            let _guard = self.write();
            self.admission.maybe_decay(step);
        }
    }

    pub(crate) fn read_guard(&self) -> RwLockReadGuard<'_, Inner> {
        self.read()
    }

    pub(crate) fn write_guard(&self) -> RwLockWriteGuard<'_, Inner> {
        self.write()
    }

    /// Grows the shards in `short` (shard, keys needed) under the exclusive
    /// lock, each by its own rehash, in parallel. Call it holding no guard
    /// of this table.
    pub(crate) fn grow(&self, short: &[(usize, usize)]) {
        let mut inner = self.write();
        inner.reclaim_spare();
        let mut need = vec![0usize; inner.shards.len()];
        for &(s, n) in short {
            need[s] += n;
        }
        inner.shards.par_iter_mut().zip(need.par_iter()).for_each(|(shard, &n)| {
            if n > 0 {
                let want = *shard.reserved.get_mut() + n;
                if want > shard.max_load {
                    let reserved = *shard.reserved.get_mut() - *shard.len.get_mut();
                    shard.rebuild(want, |_, _| true);
                    *shard.reserved.get_mut() += reserved;
                }
            }
        });
    }

    /// The lookup (and, with `step`, insert) of a prepared batch, under the
    /// shared guard `inner` of this table, with room reserved when
    /// inserting. Takes no lock.
    pub(crate) fn process(&self, inner: &Inner, prep: &Prepared, step: Option<u64>) -> BatchOut {
        let ns = prep.ns;
        let part = &prep.part;
        let num_shards = inner.ns_shards;
        let base_shard = ns * num_shards;
        struct ShardOut {
            rows: Vec<u32>,
            inserted: usize,
            error: Option<TableError>,
        }
        let per_shard: Vec<ShardOut> = prep
            .shards
            .par_iter()
            .enumerate()
            .with_min_len(4)
            .map(|(s, d)| {
                let mut out = ShardOut { rows: Vec::new(), inserted: 0, error: None };
                if d.ids.is_empty() {
                    return out;
                }
                let shard = &inner.shards[base_shard + s];
                // Phases over all distinct ids of the shard, each prefetching
                // what the next needs, so that their cache misses overlap
                // instead of forming one dependent chain per id.
                for &h in &d.hashes {
                    prefetch(&shard.keys[shard.home(h)]);
                }
                let slots: Vec<usize> = d
                    .ids
                    .iter()
                    .zip(&d.hashes)
                    .map(|(&id, &h)| if id == EMPTY { ABSENT } else { shard.find_slot(id, h).unwrap_or(ABSENT) })
                    .collect();
                for &sl in &slots {
                    if sl != ABSENT {
                        prefetch(&shard.rows[sl]);
                    }
                }
                let mut rows = Vec::with_capacity(d.ids.len());
                for (&sl, &id) in slots.iter().zip(&d.ids) {
                    let r = match (id, sl) {
                        (EMPTY, _) => inner.find(ns, EMPTY),
                        (_, ABSENT) => Ok(NO_ROW),
                        _ => shard.wait_row(sl),
                    };
                    match r {
                        Ok(r) => rows.push(r),
                        Err(e) => {
                            out.error.get_or_insert(e);
                            rows.push(NO_ROW);
                        }
                    }
                }
                out.rows = rows;
                if let Some(step) = step {
                    self.insert_absent(inner, ns, shard, d, step, &mut out.rows, &mut out.inserted, &mut out.error);
                }
                out
            })
            .collect();

        let mut base = Vec::with_capacity(num_shards + 1);
        let mut total = 0usize;
        for d in &prep.shards {
            base.push(total);
            total += d.ids.len();
        }
        let n = prep.local_idx.len();
        let mut result = UniqueLookup {
            ids: Vec::with_capacity(total),
            rows: Vec::with_capacity(total),
            inverse: vec![0u32; n],
            counts: Vec::with_capacity(total),
        };
        let mut inserted = Vec::with_capacity(num_shards);
        let mut error = None;
        for (o, d) in per_shard.into_iter().zip(&prep.shards) {
            result.ids.extend_from_slice(&d.ids);
            result.rows.extend_from_slice(&o.rows);
            result.counts.extend_from_slice(&d.counts);
            inserted.push(o.inserted);
            if error.is_none() {
                error = o.error;
            }
        }
        let inv_ptr = SendPtr(result.inverse.as_mut_ptr());
        let local_idx = &prep.local_idx;
        (0..num_shards).into_par_iter().with_min_len(16).for_each(|s| {
            for &p in &part.perm[part.offsets[s]..part.offsets[s + 1]] {
                // SAFETY: `inverse` has one element per input position and
                // positions are disjoint across shards, so no two tasks write
                // the same element.
                unsafe { *inv_ptr.get().add(p as usize) = base[s] as u32 + local_idx[p as usize] };
            }
        });
        BatchOut { result, inserted, error }
    }

    /// The insert phase of one shard's distinct ids `d`: admits the absent
    /// ones, claims their key slots, initialises and publishes their rows.
    #[allow(clippy::too_many_arguments)]
    fn insert_absent(
        &self,
        inner: &Inner,
        ns: usize,
        shard: &Shard,
        d: &ShardIds,
        step: u64,
        rows: &mut [u32],
        inserted: &mut usize,
        error: &mut Option<TableError>,
    ) {
        let step32 = step.min(u32::MAX as u64) as u32;
        let absent = rows.iter().filter(|&&r| r >= PENDING).count();
        for &r in rows.iter() {
            if r < PENDING {
                prefetch(inner.meta.row_ptr(r));
            }
        }
        // New rows for this shard in one allocation (when every new id is
        // admitted), not one contended atomic per id.
        let mut fresh = if self.admission.is_always() { inner.alloc_rows(absent) } else { Vec::new() };
        // Claim key slots for the new ids first, then write their rows, then
        // publish: no locked instruction waits behind the cold stores of a
        // new row, and those stores overlap.
        let mut claimed: Vec<(usize, usize, u32)> = Vec::new();
        let mut later: Vec<(usize, usize, bool)> = Vec::new();
        // Indexing: the loop writes `rows[j]` while reading the parallel
        // arrays `d.ids`, `d.counts`, `d.hashes`.
        #[allow(clippy::needless_range_loop)]
        for j in 0..d.ids.len() {
            let r = rows[j];
            if r < PENDING {
                inner.touch(r, d.counts[j], step32);
                continue;
            }
            let id = d.ids[j];
            if id == EMPTY {
                match self.find_or_insert_sentinel(inner, ns, d.counts[j], step, &mut fresh) {
                    // The sentinel lives beside the shards: it fills none of
                    // the reserved slots (`inserted` counts those).
                    Ok((row, _new)) => rows[j] = row,
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
                continue;
            }
            match self.claim(inner, ns, shard, id, d.hashes[j], d.counts[j], step, &mut fresh) {
                Claim::Found(row) => rows[j] = row,
                Claim::NotAdmitted => rows[j] = NO_ROW,
                Claim::New { slot, row } => claimed.push((j, slot, row)),
                Claim::Later { slot, touch } => later.push((j, slot, touch)),
                Claim::Full => {
                    error.get_or_insert(TableError::Full);
                }
            }
        }
        const AHEAD: usize = 4;
        let width = inner.values.width();
        for (c, &(j, _, row)) in claimed.iter().enumerate() {
            if let Some(&(_, _, next)) = claimed.get(c + AHEAD) {
                prefetch_row_for_write(inner.values.row_ptr(next), width);
            }
            self.init_row(inner, row, self.seeds[ns], d.ids[j], d.counts[j], step32);
        }
        for &(j, slot, row) in &claimed {
            shard.rows[slot].store(row, Ordering::Release);
            rows[j] = row;
        }
        if !claimed.is_empty() {
            shard.len.fetch_add(claimed.len(), Ordering::Relaxed);
            *inserted += claimed.len();
        }
        // Every claim of this task is published: now wait for the others'.
        for (j, slot, touch) in later {
            match shard.wait_row(slot) {
                Ok(row) if row < PENDING => {
                    if touch {
                        inner.touch(row, d.counts[j], step32);
                    }
                    rows[j] = row;
                }
                Ok(_) => rows[j] = NO_ROW,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if !fresh.is_empty() {
            inner.return_rows(fresh);
        }
    }

    /// For an id found absent by the probe phase: admits it or not, and
    /// claims its key slot with a row to be initialised and published by the
    /// caller. A racing call may have inserted it meanwhile (`Found`).
    #[allow(clippy::too_many_arguments)]
    fn claim(
        &self,
        inner: &Inner,
        ns: usize,
        shard: &Shard,
        id: u64,
        h: u64,
        count: u32,
        step: u64,
        fresh: &mut Vec<u32>,
    ) -> Claim {
        let step32 = step.min(u32::MAX as u64) as u32;
        // A key another call holds: its row now, or after our own claims.
        let held = |slot: usize, touch: bool| match shard.published(slot) {
            Some(row) if row < PENDING => {
                if touch {
                    inner.touch(row, count, step32);
                }
                Claim::Found(row)
            }
            Some(_) => Claim::NotAdmitted,
            None => Claim::Later { slot, touch },
        };
        if !self.admission.observe(self.admission_key(ns, id), count, step) {
            // A racing call may have admitted it; then it reads as stored.
            return match shard.find_slot(id, h) {
                Some(slot) => held(slot, false),
                None => Claim::NotAdmitted,
            };
        }
        // The row first, then the key: a full table leaves no claimed key
        // behind.
        let Some(row) = fresh.pop().or_else(|| inner.alloc_row()) else {
            return match shard.find_slot(id, h) {
                Some(slot) => held(slot, true),
                None => Claim::Full,
            };
        };
        match shard.find_or_claim(id, h) {
            Probe::Claimed(slot) => Claim::New { slot, row },
            Probe::Found(slot) => {
                // A racing call inserted it first: the row goes back.
                fresh.push(row);
                held(slot, true)
            }
        }
    }

    fn find_or_insert_sentinel(
        &self,
        inner: &Inner,
        ns: usize,
        count: u32,
        step: u64,
        fresh: &mut Vec<u32>,
    ) -> Result<(u32, bool)> {
        let step32 = step.min(u32::MAX as u64) as u32;
        let sentinel = &inner.sentinel_rows[ns];
        loop {
            let mut r = sentinel.load(Ordering::Acquire);
            if r == PENDING {
                r = wait_published(sentinel, || format!("id {EMPTY} of namespace {ns}"))?;
            }
            if r != NO_ROW {
                inner.touch(r, count, step32);
                return Ok((r, false));
            }
            if !self.admission.observe(self.admission_key(ns, EMPTY), count, step) {
                return Ok((NO_ROW, false));
            }
            if sentinel.compare_exchange(NO_ROW, PENDING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return match fresh.pop().or_else(|| inner.alloc_row()) {
                    Some(row) => {
                        self.init_row(inner, row, self.seeds[ns], EMPTY, count, step32);
                        sentinel.store(row, Ordering::Release);
                        Ok((row, true))
                    }
                    None => {
                        sentinel.store(NO_ROW, Ordering::Release);
                        Err(TableError::Full)
                    }
                };
            }
        }
    }

    fn init_row(&self, inner: &Inner, row: u32, seed: u64, id: u64, count: u32, step32: u32) {
        let width = inner.values.width();
        // SAFETY: `row` was just taken from the counter or the free list by
        // this thread and is not yet published, so no other thread reads or
        // writes it; its segment was ensured by `alloc_row`.
        let r = unsafe { std::slice::from_raw_parts_mut(inner.values.row_ptr(row), width) };
        self.cfg.initializer.fill(seed, id, &mut r[..self.cfg.dim]);
        r[self.cfg.dim..].fill(inner.slot_init);
        let m = inner.meta.row_ptr(row);
        // SAFETY: the meta segment was ensured with the row; META_WIDTH
        // words a row. The release store of LIVE publishes the row's values
        // to readers that check the state with an acquire load.
        unsafe {
            (*m).store(count, Ordering::Relaxed);
            (*m.add(1)).store(step32, Ordering::Relaxed);
            (*m.add(STATE)).store(LIVE, Ordering::Release);
        }
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

    /// The gather of rows known to be live under the guard `inner` held
    /// since they were checked or looked up. Sizes are the caller's to
    /// check. Takes no lock.
    pub(crate) fn gather_live(
        &self,
        inner: &Inner,
        ns: usize,
        ids: &[u64],
        rows: &[u32],
        missing: Missing,
        out: &mut [f32],
    ) {
        let seed = self.seeds[ns];
        let d = self.cfg.dim;
        debug_assert_eq!(out.len(), rows.len() * d);
        // Chunks of rows in parallel; within a chunk the rows a few places
        // ahead are prefetched, so the cache misses of random rows overlap
        // instead of being waited for one at a time.
        const CHUNK: usize = 512;
        const AHEAD: usize = 8;
        out.par_chunks_mut(CHUNK * d).zip(rows.par_chunks(CHUNK).zip(ids.par_chunks(CHUNK))).for_each(
            |(o, (rs, is))| {
                for &r in rs.iter().take(AHEAD) {
                    if r != NO_ROW {
                        prefetch_row(inner.values.row_ptr(r), d);
                    }
                }
                for (k, (&r, &id)) in rs.iter().zip(is).enumerate() {
                    if let Some(&next) = rs.get(k + AHEAD) {
                        if next != NO_ROW {
                            prefetch_row(inner.values.row_ptr(next), d);
                        }
                    }
                    let o = &mut o[k * d..(k + 1) * d];
                    if r == NO_ROW {
                        match missing {
                            Missing::Zeros => o.fill(0.0),
                            Missing::Initial => self.cfg.initializer.fill(seed, id, o),
                        }
                    } else {
                        // SAFETY: `r` is live (checked, or just looked up,
                        // under the guard the caller still holds): its
                        // segment exists and its values were written before
                        // it became live. A live row is written only under
                        // the exclusive lock, which cannot be taken while
                        // the caller holds the shared one.
                        let src = unsafe { std::slice::from_raw_parts(inner.values.row_ptr(r), d) };
                        o.copy_from_slice(src);
                    }
                }
            },
        );
    }

    /// Sets the optimizer-slot layout: `slot_width` values per row, filled
    /// with `slot_init` (existing slots are discarded). Exclusive.
    pub fn set_slots(&self, slot_width: usize, slot_init: f32) -> Result<()> {
        if !slot_init.is_finite() {
            return invalid(format!("slot initial value must be finite, got {slot_init}"));
        }
        let mut inner = self.write();
        let d = self.cfg.dim;
        let n = inner.next_row.load(Ordering::Acquire).min(MAX_ROWS) as u32;
        let fresh: Segmented<f32> = Segmented::new(d + slot_width, self.cfg.first_segment_rows);
        let old_w = inner.values.width();
        for r in 0..n {
            fresh.ensure(r);
            // SAFETY: exclusive lock held; both rows exist (old: r < next_row;
            // new: ensured above) and do not overlap (different stores).
            unsafe {
                let src = std::slice::from_raw_parts(inner.values.row_ptr(r), old_w);
                let dst = std::slice::from_raw_parts_mut(fresh.row_ptr(r), d + slot_width);
                dst[..d].copy_from_slice(&src[..d]);
                dst[d..].fill(slot_init);
            }
        }
        inner.values = fresh;
        inner.slot_width = slot_width;
        inner.slot_init = slot_init;
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
        let inner = self.write();
        self.apply_locked(&inner, GradRows::Any(rows), index, grads, opt, lr, step)
    }

    /// Checks an update, then applies it under the exclusive guard `inner`.
    /// Takes no lock. On error the table is unchanged.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_locked(
        &self,
        inner: &Inner,
        rows: GradRows<'_>,
        index: &[u32],
        grads: &[f32],
        opt: &SparseOptimizer,
        lr: f32,
        step: u64,
    ) -> Result<()> {
        let d = self.cfg.dim;
        let (GradRows::Any(rs) | GradRows::Distinct(rs)) = rows;
        if grads.len() != index.len() * d {
            return invalid(format!(
                "grads: expected {} values ({} gradient rows x dim {d}), got {}",
                index.len() * d,
                index.len(),
                grads.len()
            ));
        }
        if let Some(k) = first_where(index, |&i| i as usize >= rs.len()) {
            return invalid(format!("index[{k}] = {} is out of range for {} rows", index[k], rs.len()));
        }
        if let Some(bad) = first_where(grads, |g| !g.is_finite()) {
            let r = rs[index[bad / d] as usize];
            return invalid(format!(
                "grads: non-finite gradient {} for row {r} (gradient row {}, column {}); the table is unchanged",
                grads[bad],
                bad / d,
                bad % d
            ));
        }
        if !lr.is_finite() {
            return invalid(format!("lr must be finite, got {lr}"));
        }
        if inner.slot_width != opt.slot_width(d) {
            return invalid(format!(
                "the table's rows hold {} slot values but {} needs {}; call set_slots first",
                inner.slot_width,
                opt.name(),
                opt.slot_width(d)
            ));
        }
        // Under the exclusive lock no insert is in flight, so every row
        // below the counter has its segment (ensured before the shared lock
        // that allocated it was released). Rows from a ticket are live (its
        // epoch was checked); others are checked here.
        match rows {
            GradRows::Distinct(_) => inner.check_rows(rs, "rows", true)?,
            GradRows::Any(_) => inner.check_live(rs, "rows", true)?,
        }
        // Groups of gradient rows with one target row each: `order` lists
        // gradient rows group by group, `targets[g]` is group g's table row
        // and `starts[g]..starts[g + 1]` its span in `order`. Targets are
        // distinct either way: `Distinct` rows come from one lookup (a
        // ticket the caller verified), others are grouped by row.
        let (order, starts, targets) = match rows {
            GradRows::Distinct(rs) => group_by_index(rs, index),
            GradRows::Any(rs) => group_by_row(rs, index),
        };
        let width = inner.values.width();
        let values = &inner.values;
        let prepared = opt.prepare(lr, step);
        const CHUNK: usize = 256;
        const AHEAD: usize = 12;
        let groups = targets.len();
        (0..groups.div_ceil(CHUNK)).into_par_iter().for_each_init(
            || vec![0.0f32; d],
            |buf, c| {
                let end = ((c + 1) * CHUNK).min(groups);
                for gi in c * CHUNK..end {
                    if gi + AHEAD < end {
                        prefetch_row(values.row_ptr(targets[gi + AHEAD]), width);
                        for &k in &order[starts[gi + AHEAD]..starts[gi + AHEAD + 1]] {
                            prefetch(&grads[k as usize * d]);
                        }
                    }
                    let span = &order[starts[gi]..starts[gi + 1]];
                    let g: &[f32] = if span.len() == 1 {
                        let k = span[0] as usize;
                        &grads[k * d..(k + 1) * d]
                    } else {
                        buf.fill(0.0);
                        for &k in span {
                            let k = k as usize;
                            for (b, x) in buf.iter_mut().zip(&grads[k * d..(k + 1) * d]) {
                                *b += *x;
                            }
                        }
                        buf
                    };
                    // SAFETY: the caller holds the exclusive guard, so no
                    // other call reads or writes rows; targets are distinct
                    // (see the grouping above), so no two tasks of this call
                    // reach one row; the row's segment exists (checked
                    // above: below the counter, under the exclusive lock).
                    let row = unsafe { std::slice::from_raw_parts_mut(values.row_ptr(targets[gi]), width) };
                    let (w, slots) = row.split_at_mut(d);
                    prepared.update(w, slots, g);
                }
            },
        );
        Ok(())
    }

    /// Removes ids by `policy`; `step` is the current step (for TTL). Returns
    /// the evicted ids. Their rows are reused by later inserts. Exclusive.
    pub fn evict(&self, policy: &EvictionPolicy, step: u64) -> Vec<u64> {
        self.evict_entries(policy, step).into_iter().map(|(_, id)| id).collect()
    }

    /// [`evict`](Self::evict), returning the evicted (namespace, id) pairs.
    pub fn evict_entries(&self, policy: &EvictionPolicy, step: u64) -> Vec<(u32, u64)> {
        let mut inner = self.write();
        inner.reclaim_spare();
        let d = self.cfg.dim;
        let step32 = step.min(u32::MAX as u64) as u32;
        let meta_of = |inner: &Inner, r: u32| -> (u32, u32) {
            let m = inner.meta.row_ptr(r);
            // SAFETY: live row, exclusive lock held.
            unsafe { ((*m).load(Ordering::Relaxed), (*m.add(1)).load(Ordering::Relaxed)) }
        };
        let doomed = |inner: &Inner, r: u32| -> bool {
            let (freq, last) = meta_of(inner, r);
            if let Some(ttl) = policy.ttl_steps {
                if (step32.saturating_sub(last)) as u64 > ttl {
                    return true;
                }
            }
            if let Some(k) = policy.min_frequency {
                if freq < k {
                    return true;
                }
            }
            if let Some(t) = policy.min_l2_norm {
                // SAFETY: live row, exclusive lock held.
                let w = unsafe { std::slice::from_raw_parts(inner.values.row_ptr(r), d) };
                let n2: f32 = w.iter().map(|x| x * x).sum();
                if n2.sqrt() < t {
                    return true;
                }
            }
            false
        };
        let mut all = inner.entries();
        let (mut evicted, mut kept): (Vec<NsEntry>, Vec<NsEntry>) =
            all.drain(..).partition(|&(_, _, r)| doomed(&inner, r));
        if let Some(max) = policy.max_rows {
            if kept.len() > max {
                let excess = kept.len() - max;
                // Lower key = evicted first.
                let key = |r: u32| -> (u64, u64) {
                    let (freq, last) = meta_of(&inner, r);
                    match policy.score {
                        EvictionScore::Lru => (last as u64, freq as u64),
                        EvictionScore::Lfu => (freq as u64, last as u64),
                    }
                };
                kept.select_nth_unstable_by_key(excess - 1, |&(ns, id, r)| (key(r), id, ns));
                evicted.extend(kept.drain(..excess));
            }
        }
        if evicted.is_empty() {
            return Vec::new();
        }
        let mut gone: std::collections::HashSet<(u32, u64)> = evicted.iter().map(|&(ns, id, _)| (ns, id)).collect();
        for (ns, sentinel) in inner.sentinel_rows.iter_mut().enumerate() {
            if gone.remove(&(ns as u32, EMPTY)) {
                *sentinel.get_mut() = NO_ROW;
            }
        }
        let per_ns = inner.ns_shards;
        inner.shards.par_iter_mut().enumerate().for_each(|(s, shard)| {
            let ns = (s / per_ns) as u32;
            if shard.entries().any(|(k, _)| gone.contains(&(ns, k))) {
                shard.rebuild(0, |k, _| !gone.contains(&(ns, k)));
            }
        });
        for &(_, _, r) in &evicted {
            // SAFETY: `r` was a live row; exclusive lock held; STATE is
            // within the row's META_WIDTH words.
            unsafe { (*inner.meta.row_ptr(r).add(STATE)).store(0, Ordering::Release) };
        }
        inner.epoch += 1;
        let top = *inner.free_top.get_mut();
        inner.free.truncate(top);
        inner.free.extend(evicted.iter().map(|&(_, _, r)| r));
        *inner.free_top.get_mut() = inner.free.len();
        evicted.into_iter().map(|(ns, id, _)| (ns, id)).collect()
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

    /// Full rows (embedding and slots, `len(rows) x (dim + slot_width)`) and
    /// their metadata.
    pub fn read_rows(
        &self,
        rows: &[u32],
        values: &mut [f32],
        frequency: &mut [u32],
        last_step: &mut [u32],
    ) -> Result<()> {
        let inner = self.read();
        let w = inner.values.width();
        if values.len() != rows.len() * w || frequency.len() != rows.len() || last_step.len() != rows.len() {
            return invalid(format!("read_rows: output sizes do not match {} rows of width {w}", rows.len()));
        }
        inner.check_live(rows, "rows", false)?;
        values.par_chunks_mut(w).zip(rows.par_iter()).for_each(|(o, &r)| {
            // SAFETY: live row (checked under the shared lock still held):
            // initialised, and written only under the exclusive lock.
            o.copy_from_slice(unsafe { std::slice::from_raw_parts(inner.values.row_ptr(r), w) });
        });
        for (k, &r) in rows.iter().enumerate() {
            let m = inner.meta.row_ptr(r);
            // SAFETY: as above; meta words are atomics.
            unsafe {
                frequency[k] = (*m).load(Ordering::Relaxed);
                last_step[k] = (*m.add(1)).load(Ordering::Relaxed);
            }
        }
        Ok(())
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
            // SAFETY: exclusive lock held; row exists (found or allocated).
            unsafe {
                std::slice::from_raw_parts_mut(inner.values.row_ptr(row), w)
                    .copy_from_slice(&values[k * w..(k + 1) * w]);
                let m = inner.meta.row_ptr(row);
                (*m).store(frequency[k], Ordering::Relaxed);
                (*m.add(1)).store(last_step[k], Ordering::Relaxed);
                (*m.add(STATE)).store(LIVE, Ordering::Release);
            }
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

    /// Admission sketch counters, for checkpoints.
    pub fn admission_state(&self) -> (Vec<u32>, u32) {
        self.admission.export_counters()
    }

    pub fn set_admission_state(&self, counters: &[u32], last_decay_epoch: u32) -> Result<()> {
        let _g = self.write();
        self.admission.import_counters(counters, last_decay_epoch).map_err(TableError::InvalidArgument)
    }
}

/// A batch reduced to distinct ids per shard (`HashTable::prepare`).
pub(crate) struct Prepared {
    ns: usize,
    part: Partition,
    /// One entry per shard of the namespace.
    shards: Vec<ShardIds>,
    /// For each input position, the index of its id in its shard's `ids`.
    local_idx: Vec<u32>,
}

/// One shard's distinct ids of a batch, with their hashes and counts.
#[derive(Default)]
struct ShardIds {
    ids: Vec<u64>,
    hashes: Vec<u64>,
    counts: Vec<u32>,
}

pub(crate) struct BatchOut {
    pub(crate) result: UniqueLookup,
    inserted: Vec<usize>,
    pub(crate) error: Option<TableError>,
}

impl BatchOut {
    /// The outcome of a batch that inserted nothing (to undo a reservation).
    pub(crate) fn nothing_inserted(prep: &Prepared) -> Self {
        BatchOut { result: UniqueLookup::default(), inserted: vec![0; prep.shards.len()], error: None }
    }
}

/// The rows an update names: `Distinct` rows never repeat (one lookup's,
/// vouched for by a ticket), `Any` may.
#[derive(Clone, Copy)]
pub(crate) enum GradRows<'a> {
    Distinct(&'a [u32]),
    Any(&'a [u32]),
}

/// Waits, spinning then yielding, for `slot` to leave `PENDING`; after
/// `PENDING_WAIT` the id (`what`) is reported as stalled.
#[cold]
fn wait_published(slot: &AtomicU32, what: impl Fn() -> String) -> Result<u32> {
    let start = std::time::Instant::now();
    let mut spins = 0u32;
    loop {
        let r = slot.load(Ordering::Acquire);
        if r != PENDING {
            return Ok(r);
        }
        spins = spins.wrapping_add(1);
        if spins < 1 << 10 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
            if spins % 1024 == 0 && start.elapsed() > PENDING_WAIT {
                return Err(TableError::Stalled(format!(
                    "{}: another call claimed it {:?} ago and never published its row (did it die mid-insert?)",
                    what(),
                    PENDING_WAIT
                )));
            }
        }
    }
}

/// Hints the CPU to load `p`'s cache line; never faults.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and cannot fault, even
    // for an address outside any allocation.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Position of the first element meeting `bad`, or None. The common case —
/// nothing bad — is a branch-free scan of large chunks in parallel, which the
/// compiler vectorises; only a chunk that has a bad element is searched again.
fn first_where<T: Sync>(xs: &[T], bad: impl Fn(&T) -> bool + Sync) -> Option<usize> {
    const CHUNK: usize = 1 << 14;
    let any_bad = |c: &[T]| c.iter().fold(false, |acc, x| acc | bad(x));
    if !xs.par_chunks(CHUNK).any(any_bad) {
        return None;
    }
    xs.iter().position(&bad)
}

/// Prefetches, for writing, the cache lines of a row of `width` floats.
#[inline(always)]
fn prefetch_row_for_write(p: *mut f32, width: usize) {
    let mut off = 0;
    while off < width {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint and cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch(p.wrapping_add(off) as *const i8, std::arch::x86_64::_MM_HINT_ET0);
        }
        off += 16;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches the cache lines of a row of `width` floats.
#[inline(always)]
fn prefetch_row(p: *mut f32, width: usize) {
    let mut off = 0;
    while off < width {
        prefetch(p.wrapping_add(off));
        off += 16;
    }
}

/// Groups gradient rows by their index into distinct `rows` (counting sort,
/// linear). Index groups whose row is `NO_ROW` are dropped. Large inputs are
/// sorted in parallel (`group_by_index_parallel`).
fn group_by_index(rows: &[u32], index: &[u32]) -> (Vec<u32>, Vec<usize>, Vec<u32>) {
    // A dense gradient ([U, D], one row each, in order): nothing to group.
    if index.len() == rows.len() && index.iter().enumerate().all(|(k, &i)| i as usize == k) {
        let order: Vec<u32> = (0..rows.len() as u32).filter(|&k| rows[k as usize] != NO_ROW).collect();
        let targets = order.iter().map(|&k| rows[k as usize]).collect();
        return (order.clone(), (0..=order.len()).collect(), targets);
    }
    let threads = rayon::current_num_threads().min(8);
    // Per-chunk histograms cost `chunks x rows` words: worth it when the
    // gradient rows are many and the histograms stay small beside them.
    if threads > 1 && index.len() >= 1 << 15 && rows.len() <= 4 * index.len() {
        return group_by_index_parallel(rows, index, threads);
    }
    group_by_index_serial(rows, index)
}

fn group_by_index_serial(rows: &[u32], index: &[u32]) -> (Vec<u32>, Vec<usize>, Vec<u32>) {
    let mut starts = vec![0usize; rows.len() + 1];
    for &i in index {
        starts[i as usize + 1] += 1;
    }
    for u in 0..rows.len() {
        starts[u + 1] += starts[u];
    }
    let mut cursor = starts.clone();
    let mut order = vec![0u32; index.len()];
    for (k, &i) in index.iter().enumerate() {
        order[cursor[i as usize]] = k as u32;
        cursor[i as usize] += 1;
    }
    // Keep groups that have gradients and a row.
    let mut kept_starts = Vec::with_capacity(rows.len() + 1);
    let mut targets = Vec::with_capacity(rows.len());
    let mut kept_order = Vec::with_capacity(order.len());
    for u in 0..rows.len() {
        if starts[u] < starts[u + 1] && rows[u] != NO_ROW {
            kept_starts.push(kept_order.len());
            kept_order.extend_from_slice(&order[starts[u]..starts[u + 1]]);
            targets.push(rows[u]);
        }
    }
    kept_starts.push(kept_order.len());
    (kept_order, kept_starts, targets)
}

/// `group_by_index` as a parallel counting sort: each of `chunks` slices of
/// `index` counts its entries per distinct row, the counts become each
/// chunk's write cursors (a group's entries keep their order: chunk by
/// chunk, then position), and the chunks scatter their positions at once.
fn group_by_index_parallel(rows: &[u32], index: &[u32], chunks: usize) -> (Vec<u32>, Vec<usize>, Vec<u32>) {
    let n_rows = rows.len();
    let per = index.len().div_ceil(chunks).max(1);
    let mut counts: Vec<Vec<u32>> = index
        .par_chunks(per)
        .map(|c| {
            let mut h = vec![0u32; n_rows];
            for &i in c {
                h[i as usize] += 1;
            }
            h
        })
        .collect();
    // Kept groups (with gradients and a row), their starts in `order`.
    let mut targets = Vec::with_capacity(n_rows);
    let mut starts = Vec::with_capacity(n_rows + 1);
    let mut group_start = vec![usize::MAX; n_rows];
    let mut at = 0usize;
    for u in 0..n_rows {
        let total: usize = counts.iter().map(|h| h[u] as usize).sum();
        if total > 0 && rows[u] != NO_ROW {
            group_start[u] = at;
            starts.push(at);
            targets.push(rows[u]);
            at += total;
        }
    }
    starts.push(at);
    // Counts -> cursors: chunk c writes group u from group_start[u] plus the
    // entries of chunks before it.
    let mut before = vec![0u32; n_rows];
    for h in counts.iter_mut() {
        for (c, b) in h.iter_mut().zip(before.iter_mut()) {
            let n = *c;
            *c = *b;
            *b += n;
        }
    }
    let mut order = vec![0u32; at];
    let out = SendPtr(order.as_mut_ptr());
    index.par_chunks(per).zip(counts.par_iter_mut()).enumerate().for_each(|(c, (idx, cursor))| {
        for (k, &i) in idx.iter().enumerate() {
            let u = i as usize;
            let g = group_start[u];
            if g != usize::MAX {
                // SAFETY: every (group, chunk, rank within the chunk) has its
                // own slot below `at`: the cursors partition each group's span.
                unsafe { *out.get().add(g + cursor[u] as usize) = (c * per + k) as u32 };
                cursor[u] += 1;
            }
        }
    });
    (order, starts, targets)
}

/// Groups gradient rows by target row (sort), for rows that may repeat.
fn group_by_row(rows: &[u32], index: &[u32]) -> (Vec<u32>, Vec<usize>, Vec<u32>) {
    let mut pairs: Vec<(u32, u32)> =
        index.iter().enumerate().map(|(k, &i)| (rows[i as usize], k as u32)).filter(|&(r, _)| r != NO_ROW).collect();
    pairs.par_sort_unstable();
    let mut starts = Vec::with_capacity(pairs.len() + 1);
    let mut targets = Vec::new();
    for (k, &(r, _)) in pairs.iter().enumerate() {
        if k == 0 || pairs[k - 1].0 != r {
            starts.push(k);
            targets.push(r);
        }
    }
    starts.push(pairs.len());
    (pairs.into_iter().map(|(_, k)| k).collect(), starts, targets)
}

/// Input positions grouped by shard (a counting sort on the shard bits), with
/// each position's hash kept for the later phases.
struct Partition {
    perm: Vec<u32>,
    offsets: Vec<usize>,
    hashes: Vec<u64>,
}

impl Partition {
    fn new(ids: &[u64], num_shards: usize, shard_shift: u32) -> Self {
        let shard_of = |h: u64| if shard_shift >= 64 { 0 } else { (h >> shard_shift) as usize };
        let hashes: Vec<u64> = ids.par_iter().with_min_len(4096).map(|&id| mix64(id)).collect();
        let mut offsets = vec![0usize; num_shards + 1];
        for &h in &hashes {
            offsets[shard_of(h) + 1] += 1;
        }
        for s in 0..num_shards {
            offsets[s + 1] += offsets[s];
        }
        let mut cursor = offsets.clone();
        let mut perm = vec![0u32; ids.len()];
        for (p, &h) in hashes.iter().enumerate() {
            let s = shard_of(h);
            perm[cursor[s]] = p as u32;
            cursor[s] += 1;
        }
        Partition { perm, offsets, hashes }
    }
}

impl Inner {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    fn len(&self) -> usize {
        let sentinels = self.sentinel_rows.iter().filter(|s| s.load(Ordering::Acquire) != NO_ROW).count();
        self.shards.iter().map(|s| s.len.load(Ordering::Acquire)).sum::<usize>() + sentinels
    }

    /// Index into `shards` of the shard of namespace `ns` for hash `h`.
    #[inline]
    fn shard_of(&self, ns: usize, h: u64) -> usize {
        ns * self.ns_shards + if self.shard_shift >= 64 { 0 } else { (h >> self.shard_shift) as usize }
    }

    /// Rows of `ids` into `out`, in phases (hash and prefetch every home
    /// slot, probe, prefetch and read row indices) so the cache misses of a
    /// chunk overlap.
    fn find_many(&self, ns: usize, ids: &[u64], out: &mut [u32]) -> Result<()> {
        let shard_of = |h: u64| self.shard_of(ns, h);
        let mut slots = [ABSENT; LOOKUP_CHUNK];
        let mut hashes = [0u64; LOOKUP_CHUNK];
        for (h, &id) in hashes.iter_mut().zip(ids) {
            *h = mix64(id);
            let shard = &self.shards[shard_of(*h)];
            prefetch(&shard.keys[shard.home(*h)]);
        }
        for (k, &id) in ids.iter().enumerate() {
            if id != EMPTY {
                let shard = &self.shards[shard_of(hashes[k])];
                if let Some(sl) = shard.find_slot(id, hashes[k]) {
                    prefetch(&shard.rows[sl]);
                    slots[k] = sl;
                }
            }
        }
        for (k, &id) in ids.iter().enumerate() {
            out[k] = if id == EMPTY {
                self.find(ns, EMPTY)?
            } else if slots[k] == ABSENT {
                NO_ROW
            } else {
                self.shards[shard_of(hashes[k])].wait_row(slots[k])?
            };
        }
        Ok(())
    }

    fn find(&self, ns: usize, id: u64) -> Result<u32> {
        if id == EMPTY {
            let s = &self.sentinel_rows[ns];
            let r = s.load(Ordering::Acquire);
            if r != PENDING {
                return Ok(r);
            }
            return wait_published(s, || format!("id {EMPTY} of namespace {ns}"));
        }
        let h = mix64(id);
        Ok(self.shards[self.shard_of(ns, h)].find(id, h)?.unwrap_or(NO_ROW))
    }

    /// Records a sighting. Plain relaxed loads and stores, not read-modify-
    /// write: within a call each id is touched by one task, and a locked
    /// instruction per id would serialise the memory accesses of the batch.
    /// Concurrent calls touching the same id may lose one of their counts.
    fn touch(&self, row: u32, count: u32, step32: u32) {
        let m = self.meta.row_ptr(row);
        // SAFETY: published rows have their meta segment; words are atomics.
        unsafe {
            let f = (*m).load(Ordering::Relaxed);
            (*m).store(f.saturating_add(count), Ordering::Relaxed);
            if (*m.add(1)).load(Ordering::Relaxed) < step32 {
                (*m.add(1)).store(step32, Ordering::Relaxed);
            }
        }
    }

    /// Up to `n` rows: free rows first, then one block from the counter.
    /// Fewer only when the table is full.
    fn alloc_rows(&self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        let mut top = self.free_top.load(Ordering::Acquire);
        while top > 0 && out.len() < n {
            let take = (n - out.len()).min(top);
            match self.free_top.compare_exchange_weak(top, top - take, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    out.extend_from_slice(&self.free[top - take..top]);
                    top -= take;
                }
                Err(now) => top = now,
            }
        }
        let rest = (n - out.len()) as u64;
        if rest > 0 {
            let first = self.next_row.fetch_add(rest, Ordering::AcqRel);
            let end = (first + rest).min(MAX_ROWS);
            if first < end {
                self.values.ensure_range(first as u32, (end - 1) as u32);
                self.meta.ensure_range(first as u32, (end - 1) as u32);
                out.extend((first..end).map(|r| r as u32));
            }
        }
        out
    }

    fn return_rows(&self, rows: Vec<u32>) {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).extend(rows);
    }

    /// Moves spare rows to the free list. Exclusive.
    fn reclaim_spare(&mut self) {
        let spare = std::mem::take(self.spare.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !spare.is_empty() {
            let top = *self.free_top.get_mut();
            self.free.truncate(top);
            self.free.extend(spare);
            *self.free_top.get_mut() = self.free.len();
        }
    }

    fn alloc_row(&self) -> Option<u32> {
        let mut top = self.free_top.load(Ordering::Acquire);
        while top > 0 {
            match self.free_top.compare_exchange_weak(top, top - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(self.free[top - 1]),
                Err(now) => top = now,
            }
        }
        let r = self.next_row.fetch_add(1, Ordering::AcqRel);
        if r >= MAX_ROWS {
            return None;
        }
        let r = r as u32;
        self.values.ensure(r);
        self.meta.ensure(r);
        Some(r)
    }

    /// Reserves room for each shard's part of a batch. On failure nothing
    /// stays reserved and the shards short of room are returned with the
    /// number of keys they must fit.
    /// `parts` are the distinct ids of the shards from `base` on (one
    /// namespace's).
    fn reserve(&self, base: usize, parts: &[ShardIds]) -> std::result::Result<(), Vec<(usize, usize)>> {
        let mut short = Vec::new();
        let shards = &self.shards[base..base + parts.len()];
        for (s, shard) in shards.iter().enumerate() {
            let n = parts[s].ids.len();
            if n == 0 {
                continue;
            }
            let prev = shard.reserved.fetch_add(n, Ordering::AcqRel);
            if prev + n > shard.max_load {
                short.push((base + s, n));
            }
        }
        if !short.is_empty() {
            for (s, shard) in shards.iter().enumerate() {
                let n = parts[s].ids.len();
                if n > 0 {
                    shard.reserved.fetch_sub(n, Ordering::AcqRel);
                }
            }
            return Err(short);
        }
        Ok(())
    }

    /// Returns the unused part of a reservation.
    fn unreserve(&self, base: usize, parts: &[ShardIds], inserted: &[usize]) {
        for (s, shard) in self.shards[base..base + parts.len()].iter().enumerate() {
            let n = parts[s].ids.len();
            if n > 0 {
                shard.reserved.fetch_sub(n - inserted[s], Ordering::AcqRel);
            }
        }
    }

    /// Checks that every row (but `NO_ROW` where `allow_missing`) is live:
    /// published and not evicted. Under the shared lock a row below the
    /// counter may still be allocating (no segment yet) or initialising;
    /// neither is read.
    fn check_live(&self, rows: &[u32], name: &str, allow_missing: bool) -> Result<()> {
        let live = |r: u32| -> bool {
            match self.meta.try_row_ptr(r) {
                // SAFETY: the segment exists, so the row's META_WIDTH words
                // are allocated; they are atomics.
                Some(m) => unsafe { (*m.add(STATE)).load(Ordering::Acquire) & LIVE != 0 },
                None => false,
            }
        };
        let limit = self.next_row.load(Ordering::Acquire).min(MAX_ROWS);
        if let Some(k) = first_where(rows, |&r| !((allow_missing && r == NO_ROW) || ((r as u64) < limit && live(r)))) {
            return invalid(format!(
                "{name}[{k}] = {} is not a live row of this table (it has {limit} rows; the row is free, evicted \
                 or being inserted)",
                rows[k]
            ));
        }
        Ok(())
    }

    fn check_rows(&self, rows: &[u32], name: &str, allow_missing: bool) -> Result<()> {
        let limit = self.next_row.load(Ordering::Acquire).min(MAX_ROWS);
        if let Some(k) = first_where(rows, |&r| !((r as u64) < limit || (allow_missing && r == NO_ROW))) {
            return invalid(format!("{name}[{k}] = {} is not a row of this table (it has {limit} rows)", rows[k]));
        }
        Ok(())
    }

    /// Every (namespace, id, row), namespace by namespace.
    fn entries(&self) -> Vec<NsEntry> {
        let per_ns = self.ns_shards;
        let mut all = Vec::with_capacity(self.len());
        for (ns, sentinel) in self.sentinel_rows.iter().enumerate() {
            let shards = &self.shards[ns * per_ns..(ns + 1) * per_ns];
            let ns32 = ns as u32;
            all.par_extend(shards.par_iter().flat_map_iter(|s| s.entries().map(move |(id, r)| (ns32, id, r))));
            let r = sentinel.load(Ordering::Acquire);
            if r < PENDING {
                all.push((ns32, EMPTY, r));
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The parallel counting sort groups exactly as the serial one:
        /// the same groups, targets and order of entries within a group.
        #[test]
        fn parallel_grouping_equals_serial(
            n_rows in 1usize..300,
            picks in prop::collection::vec(any::<u32>(), 0..2000),
            missing in prop::collection::vec(any::<bool>(), 300),
            chunks in 2usize..9,
        ) {
            let rows: Vec<u32> = (0..n_rows as u32).map(|r| if missing[r as usize] { NO_ROW } else { r * 3 }).collect();
            let index: Vec<u32> = picks.iter().map(|&p| p % n_rows as u32).collect();
            prop_assert_eq!(group_by_index_parallel(&rows, &index, chunks), group_by_index_serial(&rows, &index));
        }

        /// A dense gradient (index 0..U) takes the shortcut and groups as
        /// the counting sort does.
        #[test]
        fn identity_grouping_equals_serial(
            n_rows in 0usize..300,
            missing in prop::collection::vec(any::<bool>(), 300),
        ) {
            let rows: Vec<u32> = (0..n_rows as u32).map(|r| if missing[r as usize] { NO_ROW } else { r * 3 }).collect();
            let index: Vec<u32> = (0..n_rows as u32).collect();
            prop_assert_eq!(group_by_index(&rows, &index), group_by_index_serial(&rows, &index));
        }
    }
}
