//! The row store of a table: row allocation (a counter, a free list and the
//! `spare` rows a racing insert did not use), the metadata words of each row
//! (frequency, last step seen, and the state word with its `LIVE` bit), and
//! the raw reads and writes of row memory: initialising a new row, touching
//! its metadata, gathering live rows, re-laying out the slots, reading rows
//! out, checking rows callers name, prefetching. The memory itself is
//! `store::Segmented`'s, whose segments never move.
//!
//! Invariants: a row's segments exist before its index is handed out; a new
//! row is written by the one thread that allocated it, then made live by a
//! release store of `LIVE`; a live row's values are written only under the
//! exclusive lock (its metadata words are atomics, which `touch` updates
//! under the shared one); rows that callers name are read only once
//! `check_live` accepts them. Each `unsafe` block says which of these it
//! relies on. Every read and write of row memory is here: the rest of the
//! crate goes through safe methods. Under the exclusive guard they take
//! `&mut Inner` as the proof that no other call reaches rows:
//! `update_rows` (the optimizer update, which also checks that its targets
//! are distinct), `values_mut` (import) and the read-only `Exclusive` view
//! (eviction). Metadata words are atomics (`meta_words`). The locks:
//! `pipeline.rs`, "Lock discipline".

use crate::store::Segmented;
use crate::table::{first_where, invalid, HashTable, Inner, Missing, Result, MAX_ROWS, NO_ROW};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// Metadata words per row: frequency, last step seen (low 32 bits), state.
pub(crate) const META_WIDTH: usize = 3;

/// Index of the state word in a row's metadata.
pub(crate) const STATE: usize = 2;

/// State bit of a row that holds a published id: set (release) once the row
/// is initialised, cleared when the row is evicted. Only live rows are read
/// by callers that name rows themselves.
pub(crate) const LIVE: u32 = 1;

impl Inner {
    /// Records a sighting. Plain relaxed loads and stores, not read-modify-
    /// write: within a call each id is touched by one task, and a locked
    /// instruction per id would serialise the memory accesses of the batch.
    /// Concurrent calls touching the same id may lose one of their counts.
    pub(crate) fn touch(&self, row: u32, count: u32, step32: u32) {
        let m = self.meta_words(row);
        let f = m[0].load(Ordering::Relaxed);
        m[0].store(f.saturating_add(count), Ordering::Relaxed);
        if m[1].load(Ordering::Relaxed) < step32 {
            m[1].store(step32, Ordering::Relaxed);
        }
    }

    /// A row's metadata words (frequency, last step, state). They are
    /// atomics, readable and writable under either guard. Panics if the
    /// row's segment does not exist (a row never handed out).
    #[inline(always)]
    pub(crate) fn meta_words(&self, row: u32) -> &[AtomicU32] {
        self.meta.atomic_row(row)
    }

    /// (frequency, last step seen) of a row.
    #[inline]
    pub(crate) fn frequency_and_last(&self, row: u32) -> (u32, u32) {
        let m = self.meta_words(row);
        (m[0].load(Ordering::Relaxed), m[1].load(Ordering::Relaxed))
    }

    /// The values (embedding, then slots) of one row, to write. Exclusive:
    /// `&mut self` is the exclusive guard's, so no other call reads or
    /// writes rows. Panics if the row's segment does not exist.
    pub(crate) fn values_mut(&mut self, row: u32) -> &mut [f32] {
        let width = self.values.width();
        let p = self.values.row_ptr(row);
        // SAFETY: `row_ptr` points at `width` floats inside a live segment
        // (it panics otherwise); `&mut self` excludes every other access to
        // the store for the borrow's life (rows are reached only through
        // `Inner`, and other threads only under a guard, which the
        // exclusive one that gave `&mut self` excludes).
        unsafe { std::slice::from_raw_parts_mut(p, width) }
    }

    /// A read-only view of the rows under the exclusive guard.
    pub(crate) fn exclusive(&mut self) -> Exclusive<'_> {
        Exclusive { inner: self }
    }

    /// Runs `f(state, k, row)` for every `targets[k]`, `row` being that
    /// table row's values (embedding, then slots), writable; in parallel
    /// chunks, the rows a few places ahead prefetched and
    /// `ahead(k)` called for the caller's own prefetching. Exclusive.
    /// Refuses targets that repeat or are not rows of the table, before
    /// anything is written.
    pub(crate) fn update_rows<S>(
        &mut self,
        targets: &[u32],
        init: impl Fn() -> S + Sync + Send,
        ahead: impl Fn(usize) + Sync + Send,
        f: impl Fn(&mut S, usize, &mut [f32]) + Sync + Send,
    ) -> Result<()> {
        self.check_rows(targets, "rows", false)?;
        self.check_distinct(targets)?;
        const CHUNK: usize = 256;
        const AHEAD: usize = 12;
        let width = self.values.width();
        let values = &self.values;
        let n = targets.len();
        (0..n.div_ceil(CHUNK)).into_par_iter().for_each_init(init, |state, c| {
            let end = ((c + 1) * CHUNK).min(n);
            for k in c * CHUNK..end {
                if k + AHEAD < end {
                    prefetch_row(values.row_ptr(targets[k + AHEAD]), width);
                    ahead(k + AHEAD);
                }
                // SAFETY: `&mut self` is the exclusive guard's, so no other
                // call reads or writes rows; targets are distinct (checked
                // above), so no two tasks of this call reach one row; each
                // is below the counter, and under the exclusive lock no
                // insert is in flight, so its segment exists (and
                // `row_ptr` panics, rather than pointing at nothing, if
                // that were ever wrong).
                let row = unsafe { std::slice::from_raw_parts_mut(values.row_ptr(targets[k]), width) };
                f(state, k, row);
            }
        });
        Ok(())
    }

    /// Errs if a row occurs twice in `rows` (all below the counter). One
    /// bit a row in `seen`, set then cleared again.
    fn check_distinct(&mut self, rows: &[u32]) -> Result<()> {
        let limit = self.next_row.load(Ordering::Acquire).min(MAX_ROWS) as usize;
        let words = limit.div_ceil(64);
        if self.seen.len() < words {
            self.seen.resize(words, 0);
        }
        let seen = &mut self.seen;
        let mut dup = None;
        for (k, &r) in rows.iter().enumerate() {
            let (w, b) = (r as usize >> 6, 1u64 << (r & 63));
            if seen[w] & b != 0 {
                dup = Some(k);
                break;
            }
            seen[w] |= b;
        }
        let set = dup.unwrap_or(rows.len());
        for &r in &rows[..set] {
            seen[r as usize >> 6] = 0;
        }
        match dup {
            Some(k) => invalid(format!("rows[{k}] = {} occurs twice in one update", rows[k])),
            None => Ok(()),
        }
    }

    /// Up to `n` rows: free rows first, then one block from the counter.
    /// Fewer only when the table is full.
    pub(crate) fn alloc_rows(&self, n: usize) -> Vec<u32> {
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
                self.values.populate_ahead(end, MAX_ROWS);
                self.meta.populate_ahead(end, MAX_ROWS);
                out.extend((first..end).map(|r| r as u32));
            }
        }
        out
    }

    pub(crate) fn return_rows(&self, rows: Vec<u32>) {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).extend(rows);
    }

    /// Moves spare rows to the free list. Exclusive.
    pub(crate) fn reclaim_spare(&mut self) {
        let spare = std::mem::take(self.spare.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !spare.is_empty() {
            let top = *self.free_top.get_mut();
            self.free.truncate(top);
            self.free.extend(spare);
            *self.free_top.get_mut() = self.free.len();
        }
    }

    pub(crate) fn alloc_row(&self) -> Option<u32> {
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

    /// Checks that every row (but `NO_ROW` where `allow_missing`) is live:
    /// published and not evicted. Under the shared lock a row below the
    /// counter may still be allocating (no segment yet) or initialising;
    /// neither is read.
    pub(crate) fn check_live(&self, rows: &[u32], name: &str, allow_missing: bool) -> Result<()> {
        let live = |r: u32| -> bool {
            match self.meta.try_atomic_row(r) {
                Some(m) => m[STATE].load(Ordering::Acquire) & LIVE != 0,
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

    pub(crate) fn check_rows(&self, rows: &[u32], name: &str, allow_missing: bool) -> Result<()> {
        let limit = self.next_row.load(Ordering::Acquire).min(MAX_ROWS);
        if let Some(k) = first_where(rows, |&r| !((r as u64) < limit || (allow_missing && r == NO_ROW))) {
            return invalid(format!("{name}[{k}] = {} is not a row of this table (it has {limit} rows)", rows[k]));
        }
        Ok(())
    }
}

/// Reads of row values under the exclusive guard: made from `&mut Inner`,
/// which it borrows for its life, so no write to any row can happen while
/// it exists. Offers reads only.
#[derive(Clone, Copy)]
pub(crate) struct Exclusive<'a> {
    inner: &'a Inner,
}

impl<'a> Exclusive<'a> {
    /// The first `len` values of a row (`len` at most the row's width).
    /// Panics if the row's segment does not exist.
    pub(crate) fn values(self, row: u32, len: usize) -> &'a [f32] {
        let width = self.inner.values.width();
        assert!(len <= width, "{len} values asked of a row of {width}");
        let p = self.inner.values.row_ptr(row);
        // SAFETY: `row_ptr` points at `width >= len` floats inside a live
        // segment (it panics otherwise); the `&mut Inner` this view borrows
        // excludes every write to rows while the slice lives.
        unsafe { std::slice::from_raw_parts(p, len) }
    }

    /// (frequency, last step seen) of a row.
    pub(crate) fn frequency_and_last(self, row: u32) -> (u32, u32) {
        self.inner.frequency_and_last(row)
    }
}

impl HashTable {
    pub(crate) fn init_row(&self, inner: &Inner, row: u32, seed: u64, id: u64, count: u32, step32: u32) {
        let width = inner.values.width();
        // SAFETY: `row` was just taken from the counter or the free list by
        // this thread and is not yet published, so no other thread reads or
        // writes it; its segment was ensured by `alloc_row` or `alloc_rows`.
        let r = unsafe { std::slice::from_raw_parts_mut(inner.values.row_ptr(row), width) };
        self.cfg.initializer.fill(seed, id, &mut r[..self.cfg.dim]);
        r[self.cfg.dim..].fill(inner.slot_init);
        let m = inner.meta_words(row);
        m[0].store(count, Ordering::Relaxed);
        m[1].store(step32, Ordering::Relaxed);
        // Publishes the row's values to readers that check the state with
        // an acquire load.
        m[STATE].store(LIVE, Ordering::Release);
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
            (frequency[k], last_step[k]) = inner.frequency_and_last(r);
        }
        Ok(())
    }
}

/// Hints the CPU to load `p`'s cache line; never faults.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and cannot fault, even
    // for an address outside any allocation.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches, for writing, the cache lines of a row of `width` floats.
#[inline(always)]
pub(crate) fn prefetch_row_for_write(p: *mut f32, width: usize) {
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
pub(crate) fn prefetch_row(p: *mut f32, width: usize) {
    let mut off = 0;
    while off < width {
        prefetch(p.wrapping_add(off));
        off += 16;
    }
}

#[cfg(test)]
mod tests {
    use crate::table::{HashTable, TableConfig};

    /// The exclusive update refuses targets that repeat or are not rows,
    /// before writing anything, and leaves its bitmap clear for the next.
    #[test]
    fn update_rows_refuses_repeated_and_foreign_targets() {
        let t = HashTable::new(TableConfig::new(4)).unwrap();
        let rows = t.lookup_or_insert(&[10, 20, 30], 0).unwrap();
        let before: Vec<f32> = {
            let mut inner = t.write();
            let view = inner.exclusive();
            rows.iter().flat_map(|&r| view.values(r, 4).to_vec()).collect()
        };
        let mut inner = t.write();
        let err = inner.update_rows(&[rows[0], rows[1], rows[0]], || (), |_| {}, |_, _, r| r.fill(9.0));
        assert!(err.unwrap_err().to_string().contains("occurs twice"));
        let err = inner.update_rows(&[rows[2], 1000], || (), |_| {}, |_, _, r| r.fill(9.0));
        assert!(err.unwrap_err().to_string().contains("is not a row"));
        let view = inner.exclusive();
        let after: Vec<f32> = rows.iter().flat_map(|&r| view.values(r, 4).to_vec()).collect();
        assert_eq!(before, after, "a refused update wrote rows");
        // The bitmap was cleared: the same rows, distinct, are accepted.
        inner.update_rows(&rows, || (), |_| {}, |_, k, r| r[0] = k as f32).unwrap();
        let view = inner.exclusive();
        assert_eq!(rows.iter().map(|&r| view.values(r, 1)[0]).collect::<Vec<_>>(), vec![0.0, 1.0, 2.0]);
    }
}
