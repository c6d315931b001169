//! Row storage: a segmented array whose segments double in size, so that
//! growth allocates a new segment and never moves an existing row. A row index
//! is therefore stable for the row's whole life, and a pointer to a row stays
//! valid while the store lives.
//!
//! Segment `k` holds `base << k` rows; 32 segments cover every `u32` row index
//! for any `base >= 1`. Segments are allocated zeroed and lazily (the first time
//! a row in them is claimed), installed by compare-and-swap, so allocation is
//! lock-free and concurrent callers agree on one segment.
//!
//! Segments of 2 MiB or more are mapped straight from the kernel (zeroed
//! lazily, page by page) and advised to use transparent huge pages: rows
//! are read and written at random, and with 4 KiB pages nearly every access
//! to a large table is also a TLB miss. Smaller segments come from the
//! global allocator.
//!
//! The kernel zeroes a mapped page the first time it is written, and on a
//! table that grows by tens of thousands of rows a step that first touch
//! costs more than the inserts themselves. So the store pre-faults the
//! memory of the next rows in the background (`populate_ahead`), a bounded
//! distance ahead of the row counter (an eighth of the rows so far, at
//! least `MIN_AHEAD` rows): `madvise(MADV_POPULATE_WRITE)` maps the pages
//! writable without writing them, so it races with no thread that writes
//! rows. Where the kernel lacks it, the advice fails and rows fault in as
//! before.
//!
//! This type owns memory only: which rows are live, and who may write them, is
//! the table's business (see `rows.rs`).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::marker::PhantomData;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

pub const MAX_SEGMENTS: usize = 32;
/// A transparent huge page; segments this large or larger are mapped.
const HUGE: usize = 2 << 20;
/// Rows pre-faulted ahead of the row counter, at least (`populate_ahead`).
const MIN_AHEAD: u64 = 1 << 15;

/// Marker for element types whose all-zero bit pattern is a valid value.
///
/// # Safety
/// Implementors must be valid when zero-initialised.
pub unsafe trait Zeroable: Send + Sync + 'static {}
// SAFETY: 0.0f32 and 0u32 are valid values.
unsafe impl Zeroable for f32 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: an all-zero AtomicU32 is 0.
unsafe impl Zeroable for std::sync::atomic::AtomicU32 {}

pub struct Segmented<T: Zeroable> {
    /// Elements per row.
    width: usize,
    /// log2 of the rows in segment 0.
    base_shift: u32,
    segments: [AtomicPtr<T>; MAX_SEGMENTS],
    /// Rows below this are pre-faulted, or being pre-faulted by `filler`.
    populated: AtomicU64,
    /// The background pre-fault of rows ahead, if one was started. Joined
    /// before the segments are freed.
    filler: Mutex<Option<JoinHandle<()>>>,
    _owns: PhantomData<T>,
}

// SAFETY: the store hands out raw pointers only; the segments array is atomic
// and segments are never freed before `drop`. Callers synchronise element
// access (the table; rows.rs gives its rules).
unsafe impl<T: Zeroable> Send for Segmented<T> {}
// SAFETY: as above.
unsafe impl<T: Zeroable> Sync for Segmented<T> {}

impl<T: Zeroable> Segmented<T> {
    /// `base_rows` is rounded up to a power of two.
    pub fn new(width: usize, base_rows: usize) -> Self {
        let base_shift = base_rows.max(1).next_power_of_two().trailing_zeros();
        Segmented {
            width,
            base_shift,
            segments: std::array::from_fn(|_| AtomicPtr::new(null_mut())),
            populated: AtomicU64::new(0),
            filler: Mutex::new(None),
            _owns: PhantomData,
        }
    }

    /// Pre-faults, on a background thread, the mapped memory of the rows
    /// from `next` (the row counter) up to a bounded distance ahead, once
    /// what is pre-faulted ahead of `next` falls below half that distance
    /// and no earlier pre-fault is still running. Never blocks on one; the
    /// segments of those rows are allocated here. Rows keep working without
    /// it (their pages fault in when first written).
    pub fn populate_ahead(&self, next: u64, limit: u64) {
        let ahead = (next / 8).max(MIN_AHEAD);
        let want = (next + ahead).min(limit);
        let mark = self.populated.load(Ordering::Relaxed);
        if want <= next || mark >= next + ahead / 2 || mark >= want {
            return;
        }
        let Ok(mut filler) = self.filler.try_lock() else { return };
        if filler.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(done) = filler.take() {
            let _ = done.join();
        }
        let from = mark.max(next);
        self.ensure_range(from as u32, (want - 1) as u32);
        let ranges = self.mapped_ranges(from as u32, (want - 1) as u32);
        self.populated.store(want, Ordering::Relaxed);
        if ranges.is_empty() {
            return;
        }
        // The thread gets addresses, not pointers: it only advises the
        // kernel about them and never reads or writes through them.
        let spawned = std::thread::Builder::new().name("recis-populate".into()).spawn(move || {
            for (addr, len) in ranges {
                populate(addr, len);
            }
        });
        *filler = spawned.ok();
    }

    /// (address, length) of the whole pages of mapped segments
    /// (`is_mapped`) that rows `first..=last` cover; segments must exist.
    /// Pages are taken as 4 KiB: on a kernel with larger pages the advice is
    /// refused (unaligned) and rows fault in as before.
    fn mapped_ranges(&self, first: u32, last: u32) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if self.width == 0 || first > last {
            return out;
        }
        let elem = std::mem::size_of::<T>();
        let (a, _) = self.locate(first);
        let (b, _) = self.locate(last);
        for seg in a..=b {
            let layout = self.segment_layout(seg);
            if !is_mapped(layout) {
                continue;
            }
            let seg_first = self.first_row(seg);
            let seg_rows = self.segment_rows(seg) as u64;
            let lo = (first as u64).max(seg_first) - seg_first;
            let hi = (last as u64 + 1).min(seg_first + seg_rows) - seg_first;
            let base = self.segments[seg].load(Ordering::Acquire) as usize;
            if base == 0 || lo >= hi {
                continue;
            }
            let page = 4096;
            let start = (base + lo as usize * self.width * elem) / page * page;
            let end = (base + hi as usize * self.width * elem).next_multiple_of(page).min(base + layout.size());
            if end > start {
                out.push((start, end - start));
            }
        }
        out
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// (segment, row within segment) of a row index.
    #[inline(always)]
    fn locate(&self, row: u32) -> (usize, usize) {
        let q = ((row as u64) >> self.base_shift) + 1;
        let seg = 63 - q.leading_zeros() as usize;
        (seg, (row as u64 - self.first_row(seg)) as usize)
    }

    /// The first row of segment `seg`.
    #[inline(always)]
    fn first_row(&self, seg: usize) -> u64 {
        ((1u64 << seg) - 1) << self.base_shift
    }

    /// The rows segment `seg` holds.
    fn segment_rows(&self, seg: usize) -> usize {
        1usize << (self.base_shift as usize + seg)
    }

    fn segment_layout(&self, seg: usize) -> Layout {
        Layout::array::<T>(self.segment_rows(seg) * self.width.max(1)).expect("segment size overflows usize")
    }

    /// Makes sure the segment holding `row` exists. Lock-free: racing callers
    /// allocate, one wins the compare-and-swap, the losers free theirs.
    pub fn ensure(&self, row: u32) {
        let (seg, _) = self.locate(row);
        if !self.segments[seg].load(Ordering::Acquire).is_null() {
            return;
        }
        let layout = self.segment_layout(seg);
        let fresh = alloc_segment(layout) as *mut T;
        if self.segments[seg].compare_exchange(null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // SAFETY: `fresh` was allocated above with this layout and never published.
            unsafe { free_segment(fresh as *mut u8, layout) };
        }
    }

    /// Makes sure the segments holding rows `first..=last` exist.
    pub fn ensure_range(&self, first: u32, last: u32) {
        let (a, _) = self.locate(first);
        let (b, _) = self.locate(last);
        for seg in a..=b {
            self.ensure((self.first_row(seg) as u32).max(first));
        }
    }

    /// Pointer to the first element of `row`, valid for `width` elements
    /// until the store is dropped. Panics if the row's segment does not
    /// exist (`ensure` was not called for it): that is a bug of the caller,
    /// caught before any pointer into nothing is made.
    #[inline(always)]
    pub fn row_ptr(&self, row: u32) -> *mut T {
        match self.try_row_ptr(row) {
            Some(p) => p,
            None => panic!("row {row} used before its segment was allocated"),
        }
    }

    /// [`row_ptr`](Self::row_ptr), or None if the row's segment does not
    /// exist yet.
    #[inline(always)]
    pub fn try_row_ptr(&self, row: u32) -> Option<*mut T> {
        let (seg, off) = self.locate(row);
        let p = self.segments[seg].load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: the segment holds `base << seg` rows of `width` elements and
        // `off < base << seg` by construction of `locate`, so the offset
        // stays inside its allocation.
        Some(unsafe { p.add(off * self.width) })
    }

    /// Bytes allocated by segments so far (the virtual size: pages never
    /// touched may not be resident).
    pub fn allocated_bytes(&self) -> usize {
        (0..MAX_SEGMENTS)
            .filter(|&s| !self.segments[s].load(Ordering::Acquire).is_null())
            .map(|s| self.segment_layout(s).size())
            .sum()
    }
}

impl Segmented<std::sync::atomic::AtomicU32> {
    /// The words of `row`, shared: they are atomics, so any thread may read
    /// and write them through this slice. Panics, as `row_ptr` does, if the
    /// row's segment does not exist.
    #[inline(always)]
    pub fn atomic_row(&self, row: u32) -> &[std::sync::atomic::AtomicU32] {
        self.try_atomic_row(row).unwrap_or_else(|| panic!("row {row} used before its segment was allocated"))
    }

    /// [`atomic_row`](Self::atomic_row), or None if the row's segment does
    /// not exist yet.
    #[inline(always)]
    pub fn try_atomic_row(&self, row: u32) -> Option<&[std::sync::atomic::AtomicU32]> {
        let p = self.try_row_ptr(row)?;
        // SAFETY: `try_row_ptr` points at `width` initialised (zeroed, then
        // only atomically written) words inside a segment that lives until
        // the store is dropped, which the borrow of `self` outlives; atomics
        // may be shared between threads.
        Some(unsafe { std::slice::from_raw_parts(p, self.width) })
    }
}

impl<T: Zeroable> Drop for Segmented<T> {
    fn drop(&mut self) {
        // No pre-fault outlives the memory it advises about.
        if let Some(h) = self.filler.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        for seg in 0..MAX_SEGMENTS {
            let p = *self.segments[seg].get_mut();
            if !p.is_null() {
                // SAFETY: allocated in `ensure` with this same layout.
                unsafe { free_segment(p as *mut u8, self.segment_layout(seg)) };
            }
        }
    }
}

/// Whether `alloc_segment` maps a segment of this layout (else it comes
/// from the global allocator).
fn is_mapped(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= HUGE
}

/// Zeroed memory for a segment: mapped and advised to use huge pages when
/// large (Linux), else from the global allocator. Aborts on exhaustion, as
/// the global allocator does.
fn alloc_segment(layout: Layout) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if is_mapped(layout) {
        let len = layout.size().next_multiple_of(HUGE);
        // One huge page more than needed, so a 2 MiB-aligned run of `len`
        // bytes lies inside; the slack at both ends is unmapped again.
        // SAFETY: an anonymous private mapping touches no existing memory;
        // the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout);
        }
        let start = p as usize;
        let aligned = start.next_multiple_of(HUGE);
        // SAFETY: both ranges lie inside the mapping just made and hold
        // nothing; the aligned `len` bytes between them stay mapped. Both
        // lengths are multiples of the page size (the mapping and HUGE are
        // page-aligned).
        unsafe {
            if aligned > start {
                libc::munmap(p, aligned - start);
            }
            let tail = start + len + HUGE - (aligned + len);
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Advice only: without huge pages the memory works as well.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        return aligned as *mut u8;
    }
    // SAFETY: layout has non-zero size (width.max(1) rows >= 1).
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    p
}

/// Asks the kernel to map the pages of `[addr, addr + len)` writable now
/// (`MADV_POPULATE_WRITE`, Linux 5.14), without writing them. Advice only:
/// an older kernel refuses it and the pages fault in on first write.
fn populate(addr: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        // Populate in 8 MiB steps, so the kernel's mmap lock is not held
        // for the whole range at once.
        const STEP: usize = 8 << 20;
        let mut at = addr;
        while at < addr + len {
            let n = STEP.min(addr + len - at);
            // SAFETY: `[at, at + n)` lies inside a mapping that a
            // `Segmented` owns and frees only after joining the thread that
            // runs this (`Drop`); MADV_POPULATE_WRITE changes no byte of it
            // (untouched anonymous pages read as zero before and after), so
            // it races with no thread that reads or writes rows there.
            if unsafe { libc::madvise(at as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) } != 0 {
                return;
            }
            at += n;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (addr, len);
}

/// Frees what `alloc_segment` returned for `layout`.
///
/// # Safety
/// `p` came from `alloc_segment(layout)` with this same layout and is not
/// used afterwards.
unsafe fn free_segment(p: *mut u8, layout: Layout) {
    #[cfg(target_os = "linux")]
    if is_mapped(layout) {
        // SAFETY: the caller passes a mapping of this length made by
        // `alloc_segment` (the aligned run it kept).
        unsafe { libc::munmap(p as *mut libc::c_void, layout.size().next_multiple_of(HUGE)) };
        return;
    }
    // SAFETY: the caller passes memory from `alloc_zeroed(layout)`.
    unsafe { dealloc(p, layout) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_distinct_and_stable_across_growth() {
        let s: Segmented<u32> = Segmented::new(3, 4);
        let n = 5000u32;
        for r in 0..n {
            s.ensure(r);
            let p = s.row_ptr(r);
            // SAFETY: single-threaded test, segment ensured above.
            unsafe {
                for j in 0..3 {
                    *p.add(j) = r * 3 + j as u32;
                }
            }
        }
        for r in 0..n {
            let p = s.row_ptr(r);
            for j in 0..3 {
                // SAFETY: as above.
                assert_eq!(unsafe { *p.add(j) }, r * 3 + j as u32);
            }
        }
    }

    #[test]
    fn large_segments_are_mapped_zeroed_and_aligned() {
        // Width 1024 floats, 1024 rows: segment 0 is 4 MiB, mapped.
        let s: Segmented<f32> = Segmented::new(1024, 1024);
        s.ensure(0);
        let p = s.row_ptr(0);
        assert_eq!(p as usize % HUGE, 0);
        let last = s.row_ptr(1023);
        // SAFETY: single-threaded test; rows 0 and 1023 are in segment 0.
        unsafe {
            assert_eq!(*p, 0.0);
            assert_eq!(*last.add(1023), 0.0);
            *last.add(1023) = 1.5;
            assert_eq!(*last.add(1023), 1.5);
        }
    }

    #[test]
    fn populate_ahead_keeps_rows_zeroed_and_usable() {
        // 256 floats a row, 1 KiB: segment 0 (8192 rows) is 8 MiB, mapped.
        let s: Segmented<f32> = Segmented::new(256, 8192);
        s.ensure(0);
        s.populate_ahead(1, 1 << 20);
        // The pre-fault may still be running while rows are written.
        for r in [0u32, 1, 4095, 8191, 8192, 20000, 40000] {
            s.ensure(r);
            let p = s.row_ptr(r);
            // SAFETY: single-threaded writes to ensured rows; the filler only
            // advises the kernel and never writes.
            unsafe {
                assert_eq!(*p, 0.0, "row {r} not zero");
                assert_eq!(*p.add(255), 0.0);
                *p.add(7) = r as f32;
            }
        }
        // A pre-fault still running makes the next call a no-op; wait for it.
        let join = |s: &Segmented<f32>| {
            if let Some(h) = s.filler.lock().unwrap().take() {
                h.join().unwrap();
            }
        };
        join(&s);
        s.populate_ahead(40001, 1 << 20);
        join(&s);
        assert!(s.populated.load(Ordering::Relaxed) > 40001);
        for r in [0u32, 1, 4095, 8191, 8192, 20000, 40000] {
            let p = s.row_ptr(r);
            // SAFETY: as above; the filler is joined.
            unsafe {
                assert_eq!(*p.add(7), r as f32);
                assert_eq!(*p.add(8), 0.0);
            }
        }
        // Rows the pre-fault reached but no one wrote still read zero.
        let far = (s.populated.load(Ordering::Relaxed) - 1) as u32;
        s.ensure(far);
        // SAFETY: single-threaded; segment ensured.
        unsafe { assert_eq!(*s.row_ptr(far).add(100), 0.0) };
    }

    #[test]
    fn drop_while_populating_is_safe() {
        for _ in 0..20 {
            let s: Segmented<f32> = Segmented::new(256, 8192);
            s.ensure(0);
            s.populate_ahead(1, 1 << 22);
            // The pre-fault was started, so the drop below races with it.
            assert!(s.filler.lock().unwrap().is_some());
            drop(s);
        }
    }

    #[test]
    fn populate_ahead_respects_the_limit() {
        let s: Segmented<f32> = Segmented::new(256, 8192);
        s.populate_ahead(100, 200);
        assert!(s.populated.load(Ordering::Relaxed) <= 200);
        s.populate_ahead(200, 200);
        assert!(s.populated.load(Ordering::Relaxed) <= 200);
    }

    #[test]
    fn locate_covers_the_u32_range() {
        let s: Segmented<f32> = Segmented::new(1, 1024);
        let (seg, off) = s.locate(u32::MAX - 2);
        assert!(seg < MAX_SEGMENTS);
        assert!(off < (1024usize << seg));
    }
}
