//! The table's policies on which ids keep a row. Eviction
//! (`EvictionPolicy`, `HashTable::evict`, `evict_entries`) runs under the
//! exclusive lock, between steps: it picks ids by age, frequency, embedding
//! norm and a row budget, rebuilds the shards that lose keys, clears the
//! rows' `LIVE` state, puts the rows on the free list and bumps the epoch,
//! so tickets of earlier lookups are refused. Admission is `admission.rs`;
//! here is its glue to the table: the key admission sees for an id of a
//! namespace, the decay of its counts, and its state for checkpoints.
//! Which lock each call takes: `pipeline.rs`, "Lock discipline".

use crate::idmap::{NsEntry, EMPTY, LOOKUP_CHUNK};
use crate::rows::STATE;
use crate::table::{HashTable, Inner, Result, TableError, NO_ROW};
use rayon::prelude::*;
use std::sync::atomic::Ordering;

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

impl HashTable {
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
        let mut all = inner.entries();
        let rows = inner.exclusive();
        let doomed = |r: u32| -> bool {
            let (freq, last) = rows.frequency_and_last(r);
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
                let n2: f32 = rows.values(r, d).iter().map(|x| x * x).sum();
                if n2.sqrt() < t {
                    return true;
                }
            }
            false
        };
        let (mut evicted, mut kept): (Vec<NsEntry>, Vec<NsEntry>) = all.drain(..).partition(|&(_, _, r)| doomed(r));
        if let Some(max) = policy.max_rows {
            if kept.len() > max {
                let excess = kept.len() - max;
                // Lower key = evicted first.
                let key = |r: u32| -> (u64, u64) {
                    let (freq, last) = rows.frequency_and_last(r);
                    match policy.score {
                        EvictionScore::Lru => (last as u64, freq as u64),
                        EvictionScore::Lfu => (freq as u64, last as u64),
                    }
                };
                kept.select_nth_unstable_by_key(excess - 1, |&(ns, id, r)| (key(r), id, ns));
                evicted.extend(kept.drain(..excess));
            }
        }
        remove_entries(&mut inner, evicted)
    }

    /// Removes the ids of namespace `ns` in `ids` that the table holds
    /// (others, and repeats, are ignored); returns how many it removed.
    /// Their rows are reused by later inserts. Exclusive, like `evict`
    /// (serving deltas apply their tombstones with it).
    pub fn remove_in(&self, ns: usize, ids: &[u64]) -> Result<usize> {
        self.check_ns(ns)?;
        let mut inner = self.write();
        inner.reclaim_spare();
        let mut rows = vec![NO_ROW; ids.len()];
        for (c, o) in ids.chunks(LOOKUP_CHUNK).zip(rows.chunks_mut(LOOKUP_CHUNK)) {
            inner.find_many(ns, c, o)?;
        }
        let mut doomed: Vec<NsEntry> =
            ids.iter().zip(&rows).filter(|&(_, &r)| r != NO_ROW).map(|(&id, &r)| (ns as u32, id, r)).collect();
        // A row freed twice would be handed out twice: one entry an id.
        doomed.sort_unstable_by_key(|&(_, id, _)| id);
        doomed.dedup_by_key(|&mut (_, id, _)| id);
        Ok(remove_entries(&mut inner, doomed).len())
    }

    /// What admission counts for `id` of namespace `ns`.
    #[inline]
    pub(crate) fn admission_key(&self, ns: usize, id: u64) -> u64 {
        id ^ self.salts[ns]
    }

    /// Decays the admission counts if `step` is due for it. Takes the
    /// exclusive lock: call it holding no guard of this table.
    pub(crate) fn decay_admission(&self, step: u64) {
        if self.admission.decay_due(step) {
            let _guard = self.write();
            self.admission.maybe_decay(step);
        }
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

/// Removes `evicted` (distinct entries the table holds) under the exclusive
/// lock: their keys leave the id map (each shard that loses one is
/// rebuilt), their rows lose `LIVE` and go on the free list, and the epoch
/// moves on, so tickets of earlier lookups are refused. Returns the
/// (namespace, id) pairs removed.
fn remove_entries(inner: &mut Inner, evicted: Vec<NsEntry>) -> Vec<(u32, u64)> {
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
        inner.meta_words(r)[STATE].store(0, Ordering::Release);
    }
    inner.epoch += 1;
    let top = *inner.free_top.get_mut();
    inner.free.truncate(top);
    inner.free.extend(evicted.iter().map(|&(_, _, r)| r));
    *inner.free_top.get_mut() = inner.free.len();
    evicted.into_iter().map(|(ns, id, _)| (ns, id)).collect()
}
