//! The id map of a table: id → row index. Each namespace owns a run of
//! shards, picked by the high bits of the id's mixed hash; a shard is an
//! open-addressing table with linear probing over atomic 64-bit keys and
//! atomic 32-bit row indices. The id `u64::MAX` (`EMPTY`, the empty-slot
//! marker) lives in a side slot per namespace (`Inner::sentinel_rows`).
//!
//! Owns probing (`find`, `find_slot`, `find_many`), claiming a key slot by
//! compare-and-swap (`find_or_claim`), a claimed slot's row index, which
//! reads `PENDING` until the claimer publishes it with a release store
//! (`published`, `wait_row`, `wait_published`), exclusive rebuilds and
//! growth (`insert_new`, `rebuild`, `grow`), and a batch's positions
//! grouped by shard (`Partition`).
//!
//! Invariants: a key, once claimed, stays in its slot until a `rebuild`
//! (exclusive lock); a shard's used plus reserved slots stay within
//! `max_load`, so every probe ends at an empty slot (the reservation itself
//! is `batch.rs`'s). Which lock each operation runs under: `pipeline.rs`,
//! "Lock discipline".

use crate::hash::mix64;
use crate::rows::prefetch;
use crate::table::{HashTable, Inner, Result, TableError, NO_ROW};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Row index of a slot whose key is claimed but whose row is not yet published.
pub(crate) const PENDING: u32 = u32::MAX - 1;

/// Key of an empty slot. The one id equal to it lives in its namespace's
/// side slot (`Inner::sentinel_rows`).
pub(crate) const EMPTY: u64 = u64::MAX;

/// Slot position of an id not in the id map.
pub(crate) const ABSENT: usize = usize::MAX;

/// Ids probed together by `lookup`, their misses overlapping.
pub(crate) const LOOKUP_CHUNK: usize = 64;

/// A (namespace, id, row) entry of the id map.
pub(crate) type NsEntry = (u32, u64, u32);

/// How long a reader waits for a row another thread is inserting before it
/// reports the id as stalled (an inserting thread that died mid-insert).
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) struct Shard {
    pub(crate) keys: Box<[AtomicU64]>,
    pub(crate) rows: Box<[AtomicU32]>,
    mask: usize,
    /// Slots in use.
    pub(crate) len: AtomicUsize,
    /// Slots in use plus those reserved by batches in flight; never above
    /// `max_load`, so probing always ends at an empty slot.
    pub(crate) reserved: AtomicUsize,
    pub(crate) max_load: usize,
    /// This shard's load factor. Shards differ slightly so that they do not
    /// all double in the same batch.
    load_factor: f64,
}

impl Shard {
    pub(crate) fn with_capacity(cap: usize, load_factor: f64) -> Self {
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

    pub(crate) fn capacity(&self) -> usize {
        self.mask + 1
    }

    #[inline]
    pub(crate) fn home(&self, h: u64) -> usize {
        h as usize & self.mask
    }

    /// The row published in `slot`, waiting (bounded) while another call
    /// is inserting it.
    #[inline]
    pub(crate) fn wait_row(&self, slot: usize) -> Result<u32> {
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
    pub(crate) fn find_slot(&self, key: u64, h: u64) -> Option<usize> {
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
    pub(crate) fn find_or_claim(&self, key: u64, h: u64) -> Probe {
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
    pub(crate) fn published(&self, slot: usize) -> Option<u32> {
        let r = self.rows[slot].load(Ordering::Acquire);
        (r != PENDING).then_some(r)
    }

    /// Inserts a key known to be absent, under exclusive access.
    pub(crate) fn insert_new(&mut self, key: u64, row: u32) {
        let mut i = self.home(mix64(key));
        while *self.keys[i].get_mut() != EMPTY {
            i = (i + 1) & self.mask;
        }
        *self.keys[i].get_mut() = key;
        *self.rows[i].get_mut() = row;
        *self.len.get_mut() += 1;
    }

    /// Live (key, row) pairs.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.keys.iter().zip(self.rows.iter()).filter_map(|(k, r)| {
            let k = k.load(Ordering::Acquire);
            let r = r.load(Ordering::Acquire);
            (k != EMPTY && r < PENDING).then_some((k, r))
        })
    }

    /// Rebuilds the shard with room for `min_len` keys, keeping only the
    /// entries `keep` accepts. Exclusive access.
    pub(crate) fn rebuild(&mut self, min_len: usize, mut keep: impl FnMut(u64, u32) -> bool) {
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

pub(crate) enum Probe {
    /// The key's slot (its row may still be pending).
    Found(usize),
    Claimed(usize),
}

impl Inner {
    pub(crate) fn len(&self) -> usize {
        let sentinels = self.sentinel_rows.iter().filter(|s| s.load(Ordering::Acquire) != NO_ROW).count();
        self.shards.iter().map(|s| s.len.load(Ordering::Acquire)).sum::<usize>() + sentinels
    }

    /// Index into `shards` of the shard of namespace `ns` for hash `h`.
    #[inline]
    pub(crate) fn shard_of(&self, ns: usize, h: u64) -> usize {
        ns * self.ns_shards + if self.shard_shift >= 64 { 0 } else { (h >> self.shard_shift) as usize }
    }

    /// Rows of `ids` into `out`, in phases (hash and prefetch every home
    /// slot, probe, prefetch and read row indices) so the cache misses of a
    /// chunk overlap.
    pub(crate) fn find_many(&self, ns: usize, ids: &[u64], out: &mut [u32]) -> Result<()> {
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

    pub(crate) fn find(&self, ns: usize, id: u64) -> Result<u32> {
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

    /// Every (namespace, id, row), namespace by namespace.
    pub(crate) fn entries(&self) -> Vec<NsEntry> {
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

impl HashTable {
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
}

/// Waits, spinning then yielding, for `slot` to leave `PENDING`; after
/// `PENDING_WAIT` the id (`what`) is reported as stalled.
#[cold]
pub(crate) fn wait_published(slot: &AtomicU32, what: impl Fn() -> String) -> Result<u32> {
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

/// Input positions grouped by shard (a counting sort on the shard bits), with
/// each position's hash kept for the later phases.
pub(crate) struct Partition {
    pub(crate) perm: Vec<u32>,
    pub(crate) offsets: Vec<usize>,
    pub(crate) hashes: Vec<u64>,
}

impl Partition {
    pub(crate) fn new(ids: &[u64], num_shards: usize, shard_shift: u32) -> Self {
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
