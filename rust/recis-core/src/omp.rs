//! torch's OpenMP team, parked while the core's rayon work runs.
//!
//! torch runs its CPU ops on an OpenMP team (libgomp in the PyPI wheels).
//! After each parallel op the team's worker threads spin, waiting for the
//! next one: with `OMP_WAIT_POLICY` unset libgomp spins 300,000 times
//! before it sleeps, milliseconds on current cores. The sparse step's
//! lookup and update come right after a torch op, and their rayon threads
//! then share the cores with spinning threads: on 2 cores a lookup took
//! 10.5 ms right after a torch op against 4.8 ms with torch idle
//! (BENCHMARKS.md, "Lookup split").
//!
//! [`parked`] runs a closure while that team sleeps: it opens an OpenMP
//! parallel region (`GOMP_parallel`) whose master thread, the caller, runs
//! the closure, and whose other threads wait on a condition variable, not
//! spinning, until it returns. Waking a spinning team costs microseconds,
//! and torch's `set_num_threads` decides how many threads it has, as for
//! any torch op.
//!
//! Without libgomp in the process (pure Rust, or a torch built on another
//! OpenMP), or with `RECIS_OMP_PARK=0` (or [`set_enabled`]), [`parked`]
//! just calls the closure.
//! libgomp is looked for once, at the first call: torch must be loaded
//! before then (`import recis` imports it first).

use std::any::Any;
use std::cell::Cell;
use std::ffi::{c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::{self, ThreadId};

/// libgomp's `void GOMP_parallel(void (*fn)(void *), void *data, unsigned
/// num_threads, unsigned flags)` (libgomp_g.h; libiomp5 exports the same).
/// It runs `fn(data)` on every thread of a new team, the caller as its
/// master, and returns once all of them have returned.
pub type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// An OpenMP runtime's entry point to parallel regions.
#[derive(Clone, Copy)]
pub struct Team {
    parallel: GompParallel,
}

impl Team {
    /// The team of `GOMP_parallel` from libgomp's C ABI.
    ///
    /// # Safety
    /// `parallel` must behave as libgomp's `GOMP_parallel`: call its
    /// function once on each thread of a team that includes the calling
    /// thread, and return only after every call has returned.
    pub unsafe fn from_gomp(parallel: GompParallel) -> Team {
        Team { parallel }
    }

    /// The libgomp already loaded in this process (RTLD_DEFAULT: torch
    /// loads it into the global scope), if any.
    fn loaded() -> Option<Team> {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only
        // reads the symbol tables of the objects already loaded.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: `GOMP_parallel` is libgomp's exported entry point (and
        // libiomp5's GNU-compatible one) with the C signature of
        // `GompParallel`, and the contract `from_gomp` asks for. The
        // pointer is cached for the process: a library in the global scope
        // that exports it is an OpenMP runtime that torch (or whoever
        // loaded it) never unloads.
        Some(unsafe { Team::from_gomp(std::mem::transmute::<*mut c_void, GompParallel>(p)) })
    }
}

/// The libgomp of this process, looked for once.
fn team() -> Option<Team> {
    static TEAM: OnceLock<Option<Team>> = OnceLock::new();
    *TEAM.get_or_init(Team::loaded)
}

/// Whether [`parked`] parks, until [`set_enabled`] says otherwise:
/// `RECIS_OMP_PARK` (`0`: no, else yes); unset, yes unless
/// `OMP_WAIT_POLICY` is `passive` (a team that sleeps at once has nothing
/// to park, and waking it would cost a little).
fn enabled() -> &'static AtomicBool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| {
        let on = match std::env::var("RECIS_OMP_PARK") {
            Ok(v) => v != "0",
            Err(_) => !std::env::var("OMP_WAIT_POLICY").is_ok_and(|p| p.eq_ignore_ascii_case("passive")),
        };
        AtomicBool::new(on)
    })
}

/// Turns parking on or off for the process (benchmarks compare both in one
/// process; the default comes from `RECIS_OMP_PARK`).
pub fn set_enabled(on: bool) {
    enabled().store(on, Ordering::Relaxed);
}

/// Whether [`parked`] parks a team in this process: libgomp is loaded and
/// parking is enabled.
pub fn active() -> bool {
    team().is_some() && enabled().load(Ordering::Relaxed)
}

/// Runs `f` on the calling thread while the threads of torch's OpenMP team
/// wait without spinning (see the module docs); returns what `f` returns
/// and resumes its panic, if it panics. Inside a rayon worker (the core's
/// own parallel work) or with no team, it just calls `f`.
pub fn parked<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match team() {
        Some(t) if should_park() => parked_on(t, 0, f),
        _ => f(),
    }
}

thread_local! {
    /// Whether this thread is inside a parked region already.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Parks only where it pays and creates no threads: on the process's main
/// thread (where training and torch's ops run, and whose team torch sized;
/// another thread would get a team of its own, of every core, that then
/// spins), not inside a parked region (a nested one would be a team of
/// one, or with nesting enabled a new team), not on a rayon worker, and
/// only when enabled.
fn should_park() -> bool {
    enabled().load(Ordering::Relaxed)
        && rayon::current_thread_index().is_none()
        && !INSIDE.with(Cell::get)
        && main_thread()
}

fn main_thread() -> bool {
    // SAFETY: gettid and getpid take no arguments and cannot fail.
    unsafe { libc::gettid() == libc::getpid() }
}

/// Parked regions run so far in this process (tests and diagnostics).
pub fn regions() -> u64 {
    REGIONS.load(Ordering::Relaxed)
}

static REGIONS: AtomicU64 = AtomicU64::new(0);

/// The state one parallel region shares: the closure (taken by the master)
/// and its outcome, and the flag its other threads wait on.
struct Region<F, R> {
    master: ThreadId,
    f: Mutex<Option<F>>,
    out: Mutex<Option<Result<R, Box<dyn Any + Send>>>>,
    done: Mutex<bool>,
    wake: Condvar,
    /// How many threads other than the master have come to wait.
    waiting: AtomicUsize,
}

/// Sets `done` and wakes the waiting threads when dropped, even while `f`
/// unwinds, so that no thread of the team waits forever.
struct Release<'a>(&'a Mutex<bool>, &'a Condvar);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.1.notify_all();
    }
}

extern "C" fn region_entry<F: FnOnce(&AtomicUsize) -> R + Send, R: Send>(data: *mut c_void) {
    // SAFETY: `data` is the `&Region<F, R>` of `parked_on`, which lives on
    // its stack until `GOMP_parallel` returns, and that returns only after
    // every thread has returned from here (the contract of `Team`). Sharing
    // it between the team's threads is sound: `F` and `R` are `Send`
    // (`parked_counting`'s bounds), so every field is `Sync`, and it is
    // only used through shared references and its locks.
    let r = unsafe { &*(data as *const Region<F, R>) };
    // Nothing here may unwind into C: `f`'s panic is caught, and the locks
    // are taken through their poison.
    if thread::current().id() == r.master {
        let _release = Release(&r.done, &r.wake);
        let f = r.f.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            INSIDE.with(|c| c.set(true));
            let out = catch_unwind(AssertUnwindSafe(|| f(&r.waiting)));
            INSIDE.with(|c| c.set(false));
            *r.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
        }
    } else {
        r.waiting.fetch_add(1, Ordering::SeqCst);
        let mut done = r.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = r.wake.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// [`parked`] on `team`, with `threads` threads (0: the team's default, the
/// caller's `omp_set_num_threads`, which torch's `set_num_threads` sets).
pub fn parked_on<R: Send>(team: Team, threads: u32, f: impl FnOnce() -> R + Send) -> R {
    parked_counting(team, threads, |_| f()).0
}

/// [`parked_on`], `f` given the count of the team's other threads that
/// have come to wait, and that count at the end.
fn parked_counting<R: Send>(team: Team, threads: u32, f: impl FnOnce(&AtomicUsize) -> R + Send) -> (R, usize) {
    REGIONS.fetch_add(1, Ordering::Relaxed);
    let region = Region {
        master: thread::current().id(),
        f: Mutex::new(Some(f)),
        out: Mutex::new(None),
        done: Mutex::new(false),
        wake: Condvar::new(),
        waiting: AtomicUsize::new(0),
    };
    fn entry<F: FnOnce(&AtomicUsize) -> R + Send, R: Send>(_: &Region<F, R>) -> extern "C" fn(*mut c_void) {
        region_entry::<F, R>
    }
    // SAFETY: `team` calls the entry once on each thread of a team that
    // includes this one, and returns after all have returned (its
    // contract), so `region` outlives every use of the pointer; the entry
    // never unwinds (it catches `f`'s panic).
    unsafe { (team.parallel)(entry(&region), &region as *const _ as *mut c_void, threads, 0) };
    let waited = region.waiting.into_inner();
    match region.out.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(Ok(r)) => (r, waited),
        Some(Err(p)) => resume_unwind(p),
        // The runtime did not run the entry on this thread: run f here.
        None => {
            let f = region.f.into_inner().unwrap_or_else(|e| e.into_inner()).expect("f not taken");
            let none = AtomicUsize::new(0);
            (f(&none), waited)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The system's libgomp, loaded for the test (none: the test says so
    /// and passes nothing off as checked).
    fn gomp() -> Option<Team> {
        // SAFETY: dlopen of a NUL-terminated name; the handle is never
        // closed, so the symbol stays valid for the process.
        let h = unsafe { libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            eprintln!("libgomp.so.1 not found: the OpenMP parking tests check nothing here");
            return None;
        }
        // SAFETY: as `Team::loaded`, from this handle.
        let p = unsafe { libc::dlsym(h, c"GOMP_parallel".as_ptr()) };
        assert!(!p.is_null(), "libgomp without GOMP_parallel");
        // SAFETY: libgomp's GOMP_parallel (see `Team::loaded`).
        Some(unsafe { Team::from_gomp(std::mem::transmute::<*mut c_void, GompParallel>(p)) })
    }

    #[test]
    fn runs_on_the_caller_while_the_others_wait() {
        let Some(team) = gomp() else { return };
        let me = thread::current().id();
        let mut seen = 0;
        let (got, waited) = parked_counting(team, 4, |waiting| {
            assert_eq!(thread::current().id(), me, "f runs on the calling thread");
            // f runs while the three others wait: it sees them arrive.
            let t0 = std::time::Instant::now();
            while waiting.load(Ordering::SeqCst) < 3 && t0.elapsed() < Duration::from_secs(10) {
                thread::sleep(Duration::from_millis(1));
            }
            seen = waiting.load(Ordering::SeqCst);
            7
        });
        assert_eq!(seen, 3, "the three others were waiting while f ran");
        assert_eq!(got, 7);
        assert_eq!(waited, 3, "every other thread of the 4 waited for f");
        // And again: the team is reused, the region is fresh.
        assert_eq!(parked_on(team, 4, || "again"), "again");
    }

    #[test]
    fn a_panic_comes_back_and_frees_the_team() {
        let Some(team) = gomp() else { return };
        let caught = catch_unwind(|| parked_on(team, 3, || -> u32 { panic!("inside the region") }));
        let msg = caught.expect_err("the panic is resumed on the caller");
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"inside the region"));
        // The team's threads were released: a next region runs.
        assert_eq!(parked_on(team, 3, || 5), 5);
    }

    #[test]
    fn rayon_work_inside_runs_and_a_rayon_caller_is_not_parked() {
        use rayon::prelude::*;
        let Some(team) = gomp() else { return };
        let sum: u64 = parked_on(team, 2, || (0..100_000u64).into_par_iter().sum());
        assert_eq!(sum, 100_000 * 99_999 / 2);
        // From inside rayon, `parked` is a plain call (no team per worker).
        let v: Vec<usize> = (0..8).into_par_iter().map(|i| parked(|| i * 2)).collect();
        assert_eq!(v, (0..8).map(|i| i * 2).collect::<Vec<_>>());
    }
}
