//! `recis._native`: thin PyO3 bindings of recis-core. Argument conversion,
//! GIL release and error mapping only — every rule lives in recis-core.
//! One file per concern: `table` (tables, lookups, tickets), `pool`
//! (pooling), `optim` (optimizer kernels and updates), `features` (feature
//! ops), `io` (ORC reading), `ckpt` (checkpoint checksums and headers).
//!
//! Ids cross as int64 arrays and are reinterpreted as u64 bit for bit (so
//! negative ids are valid keys); row indices cross as uint32 arrays, with
//! `NO_ROW` (2**32 - 1) for an id without a row.

use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use recis_core::{TableError, NO_ROW};

mod ckpt;
mod features;
mod io;
mod optim;
mod pool;
mod table;

pyo3::create_exception!(
    recis,
    DataError,
    PyValueError,
    "Malformed input data: a file that cannot be read, is corrupt, or lacks a column. The message names the file, \
     and the stripe and column where known."
);

pub(crate) fn to_py(e: TableError) -> PyErr {
    match e {
        TableError::InvalidArgument(m) => PyValueError::new_err(m),
        TableError::Full => PyMemoryError::new_err(e.to_string()),
        TableError::Stalled(m) => PyRuntimeError::new_err(m),
    }
}

pub(crate) fn value_err(m: String) -> PyErr {
    PyValueError::new_err(m)
}

pub(crate) fn contiguous<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| value_err(format!("{name} must be a contiguous 1-D array")))
}

pub(crate) fn as_u64(ids: &[i64]) -> &[u64] {
    // SAFETY: i64 and u64 have the same size and alignment, and every bit
    // pattern is valid for both.
    unsafe { std::slice::from_raw_parts(ids.as_ptr() as *const u64, ids.len()) }
}

pub(crate) fn into_i64(v: Vec<u64>) -> Vec<i64> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same size and alignment; the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut i64, v.len(), v.capacity()) }
}

/// A kernel's parameter list, of the length it takes.
pub(crate) fn params<const N: usize>(kind: &str, p: &[f64]) -> PyResult<[f64; N]> {
    p.try_into().map_err(|_| value_err(format!("{kind} takes {N} parameters, got {}", p.len())))
}

/// Parallel argument lists of a call have one entry each.
pub(crate) fn same_len(a: usize, b: usize, what: &str) -> PyResult<()> {
    if a != b {
        return Err(value_err(format!("{what}: {a} inputs but {b} parameters")));
    }
    Ok(())
}

/// The contiguous slices of a list of arrays (`name[k]` in errors).
pub(crate) fn slices<'a, T: numpy::Element>(xs: &'a [PyReadonlyArray1<'_, T>], name: &str) -> PyResult<Vec<&'a [T]>> {
    xs.iter().enumerate().map(|(k, a)| contiguous(a, &format!("{name}[{k}]"))).collect()
}

/// Number of threads of the rayon pool used by every batch call.
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Whether the core parks torch's OpenMP team while its rayon threads
/// work (libgomp is loaded, and `RECIS_OMP_PARK` is not `0` or `on` says
/// so; see recis-core's `omp`). `on`: turn it on or off first.
#[pyfunction]
#[pyo3(signature = (on=None))]
fn openmp_parking(on: Option<bool>) -> bool {
    if let Some(on) = on {
        recis_core::omp::set_enabled(on);
    }
    recis_core::omp::active()
}

/// How many parked regions the core has run in this process.
#[pyfunction]
fn openmp_parked_regions() -> u64 {
    recis_core::omp::regions()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<table::PyHashTable>()?;
    m.add_class::<table::PyTicket>()?;
    m.add_function(wrap_pyfunction!(table::lookup_unique_many, m)?)?;
    m.add_function(wrap_pyfunction!(table::lookup_gather_many, m)?)?;
    m.add_function(wrap_pyfunction!(table::distinct_many, m)?)?;
    m.add_class::<optim::PyOptimizer>()?;
    m.add_function(wrap_pyfunction!(optim::apply_gradients_many, m)?)?;
    m.add_function(wrap_pyfunction!(optim::apply_pooled, m)?)?;
    m.add_function(wrap_pyfunction!(pool::pool_forward, m)?)?;
    m.add_function(wrap_pyfunction!(pool::pool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(features::fingerprint64, m)?)?;
    m.add_function(wrap_pyfunction!(features::hash_strings_many, m)?)?;
    m.add_function(wrap_pyfunction!(features::hash_ids_many, m)?)?;
    m.add_function(wrap_pyfunction!(features::mod_many, m)?)?;
    m.add_function(wrap_pyfunction!(features::multi_hash_many, m)?)?;
    m.add_function(wrap_pyfunction!(features::bucketize_many, m)?)?;
    m.add_function(wrap_pyfunction!(features::cross_many, m)?)?;
    m.add_function(wrap_pyfunction!(features::truncate_many, m)?)?;
    m.add_class::<io::PyOrcSource>()?;
    m.add_class::<io::PyOrcReader>()?;
    m.add_function(wrap_pyfunction!(ckpt::checksum_algorithm, m)?)?;
    m.add_function(wrap_pyfunction!(ckpt::checksum_file, m)?)?;
    m.add_function(wrap_pyfunction!(ckpt::checksum_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(ckpt::check_safetensors_file, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(openmp_parking, m)?)?;
    m.add_function(wrap_pyfunction!(openmp_parked_regions, m)?)?;
    m.add("DataError", m.py().get_type::<DataError>())?;
    m.add("NO_ROW", NO_ROW)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
