//! The batch machinery behind `pipeline.rs`. A batch of ids of one
//! namespace is prepared with no lock held — partitioned by shard and
//! reduced to its distinct ids (`Prepared`); room for it is reserved in
//! the id map (`reserve`, undone by `unreserve`); then it is processed under
//! the shared guard (`process`): probed, and when inserting, its absent ids
//! admitted, their key slots claimed, their rows initialised and published
//! (`insert_absent`, `claim`), shard by shard in parallel. An update
//! (`apply_locked`) checks its input, groups gradients by target row
//! (`group_by_*`) and applies the optimizer under the exclusive guard.
//!
//! Nothing here takes a lock: each function runs under the guard its
//! caller holds (`pipeline.rs`, "Lock discipline"). Within a call each
//! shard — so each key slot and each row it inserts — is worked by one
//! task, and the target rows of an update are distinct.

use crate::idmap::{wait_published, Partition, Probe, Shard, ABSENT, EMPTY, PENDING};
use crate::optim::SparseOptimizer;
use crate::rows::{prefetch, prefetch_row_for_write};
use crate::table::{first_where, invalid, HashTable, Inner, Result, TableError, UniqueLookup, NO_ROW};
use rayon::prelude::*;
use std::sync::atomic::Ordering;

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

/// What `claim` made of an id the probe found absent.
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

    /// Checks an update, then applies it under the exclusive guard `inner`.
    /// Takes no lock. On error the table is unchanged.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_locked(
        &self,
        inner: &mut Inner,
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
        // distinct either way (`Distinct` rows come from one lookup, others
        // are grouped by row); `update_rows` checks it before writing.
        let (order, starts, targets) = match rows {
            GradRows::Distinct(rs) => group_by_index(rs, index),
            GradRows::Any(rs) => group_by_row(rs, index),
        };
        let prepared = opt.prepare(lr, step);
        let ahead = |gi: usize| {
            for &k in &order[starts[gi]..starts[gi + 1]] {
                prefetch(&grads[k as usize * d]);
            }
        };
        inner.update_rows(
            &targets,
            || vec![0.0f32; d],
            ahead,
            |buf, gi, row| {
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
                let (w, slots) = row.split_at_mut(d);
                prepared.update(w, slots, g);
            },
        )
    }
}

impl Inner {
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
