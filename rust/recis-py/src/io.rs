//! ORC reading: a dataset's files (`OrcSource`) and its readers
//! (`OrcReader`), `recis_core::io`.

use crate::{value_err, DataError};
use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::Arc;

use recis_core::io::{self as rio, ColumnRequest, Cursor, Element, Limits, Values};
use std::path::PathBuf;

fn io_err(e: rio::IoError) -> PyErr {
    match e {
        rio::IoError::Data(m) => DataError::new_err(m),
        rio::IoError::Usage(m) => PyValueError::new_err(m),
    }
}

/// Runs `f`, turning a panic (a bug: the core returns errors for bad data)
/// into a `DataError` naming what was being read, rather than a
/// `PanicException` that `except Exception` does not catch.
fn guarded<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<T, rio::IoError>) -> Result<T, rio::IoError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = rio::panic_message(&*p);
        Err(rio::IoError::Data(format!("{}: internal error in the ORC reader ({msg}); please report it", what())))
    })
}

/// The ORC files of a dataset, their stripes and the requested columns.
#[pyclass(name = "OrcSource", module = "recis._native", frozen)]
pub(crate) struct PyOrcSource {
    source: Arc<rio::Source>,
}

#[pymethods]
impl PyOrcSource {
    /// `columns`: (name, hash, bucket) per requested column; `limits`:
    /// (max_stripe_rows, max_stripe_bytes, max_list_elements,
    /// max_decoded_bytes), None for the defaults.
    #[new]
    #[pyo3(signature = (paths, columns, limits=None))]
    fn new(
        py: Python<'_>,
        paths: Vec<PathBuf>,
        columns: Vec<(String, bool, u64)>,
        limits: Option<(u64, u64, u64, u64)>,
    ) -> PyResult<Self> {
        let columns: Vec<ColumnRequest> =
            columns.into_iter().map(|(name, hash, bucket)| ColumnRequest { name, hash, bucket }).collect();
        let limits = limits.map_or_else(
            Limits::default,
            |(max_stripe_rows, max_stripe_bytes, max_list_elements, max_decoded_bytes)| Limits {
                max_stripe_rows,
                max_stripe_bytes,
                max_list_elements,
                max_decoded_bytes,
            },
        );
        let what = || paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        let source = py
            .detach(|| {
                guarded(what, || {
                    rio::expand_paths(&paths).and_then(|files| rio::Source::open_with_limits(&files, &columns, limits))
                })
            })
            .map_err(io_err)?;
        Ok(PyOrcSource { source: Arc::new(source) })
    }

    #[getter]
    fn files(&self) -> Vec<String> {
        self.source.files.iter().map(|f| f.display().to_string()).collect()
    }

    /// (name, element type, is_list, hashed) per column.
    fn column_types(&self) -> Vec<(String, &'static str, bool, bool)> {
        self.source
            .columns
            .iter()
            .zip(&self.source.types)
            .map(|(c, t)| {
                let e = match (t.element, c.hash) {
                    (Element::Int, _) | (Element::String, true) => "int64",
                    (Element::Float32, _) => "float32",
                    (Element::Float64, _) => "float64",
                    (Element::String, false) => "string",
                };
                (c.name.clone(), e, t.list, c.hash)
            })
            .collect()
    }

    fn total_rows(&self) -> u64 {
        self.source.total_rows()
    }

    /// Rows of each unit of a worker's plan for an epoch.
    fn plan_rows(&self, shuffle: bool, seed: u64, epoch: u64, worker_idx: usize, worker_num: usize) -> Vec<u64> {
        rio::plan(&self.source.units, shuffle, seed, epoch, worker_idx, worker_num).iter().map(|u| u.rows).collect()
    }

    /// Where each unit of a worker's plan for an epoch comes from: (file,
    /// stripe, rows of the file before it, its rows).
    fn plan_units(
        &self,
        shuffle: bool,
        seed: u64,
        epoch: u64,
        worker_idx: usize,
        worker_num: usize,
    ) -> Vec<(String, usize, u64, u64)> {
        rio::plan(&self.source.units, shuffle, seed, epoch, worker_idx, worker_num)
            .iter()
            .map(|u| {
                let file = self.source.files[u.file].display().to_string();
                (file, u.stripe, u.file_row, u.rows)
            })
            .collect()
    }

    /// A reader of a worker's plan for an epoch, starting at (unit, row).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (shuffle, seed, epoch, worker_idx, worker_num, unit, row, batch_size, drop_remainder, num_threads, prefetch))]
    fn reader(
        &self,
        shuffle: bool,
        seed: u64,
        epoch: u64,
        worker_idx: usize,
        worker_num: usize,
        unit: usize,
        row: u64,
        batch_size: usize,
        drop_remainder: bool,
        num_threads: usize,
        prefetch: usize,
    ) -> PyResult<PyOrcReader> {
        if worker_num == 0 || worker_idx >= worker_num {
            return Err(value_err(format!("worker_idx {worker_idx} must be in [0, worker_num={worker_num})")));
        }
        let plan = rio::plan(&self.source.units, shuffle, seed, epoch, worker_idx, worker_num);
        let reader = rio::Reader::new(
            Arc::clone(&self.source),
            plan,
            Cursor { unit, row },
            batch_size,
            drop_remainder,
            num_threads,
            prefetch,
        )
        .map_err(io_err)?;
        Ok(PyOrcReader { reader: std::sync::Mutex::new(Some(reader)) })
    }
}

/// One reader; a mutex makes it shareable (pyo3 requires Sync) — it is used
/// by one Python iterator at a time, so the lock is never contended.
#[pyclass(name = "OrcReader", module = "recis._native", frozen)]
pub(crate) struct PyOrcReader {
    reader: std::sync::Mutex<Option<rio::Reader>>,
}

type PyColumn<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyArray1<i64>>>, Option<Bound<'py, PyArray1<i64>>>);

#[pymethods]
impl PyOrcReader {
    /// The next batch as (columns, rows, (unit, row) after it), or None at
    /// the end. A column is (values, string offsets or None, row offsets or
    /// None for a column of one value a row).
    #[allow(clippy::type_complexity)]
    fn next_batch<'py>(&self, py: Python<'py>) -> PyResult<Option<(Vec<PyColumn<'py>>, usize, (usize, u64))>> {
        let batch = py
            .detach(|| {
                let mut guard = self.reader.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut() {
                    Some(r) => guarded(|| "reading a batch".into(), || r.next_batch()),
                    None => Ok(None),
                }
            })
            .map_err(io_err)?;
        let Some(batch) = batch else { return Ok(None) };
        let cols = batch
            .columns
            .into_iter()
            .map(|c| {
                let offsets = c.offsets.map(|o| o.into_pyarray(py));
                let (values, str_offsets): (Bound<'py, PyAny>, Option<Bound<'py, PyArray1<i64>>>) = match c.values {
                    Values::Int(v) => (v.into_pyarray(py).into_any(), None),
                    Values::Float32(v) => (v.into_pyarray(py).into_any(), None),
                    Values::Float64(v) => (v.into_pyarray(py).into_any(), None),
                    Values::Bytes { data, offsets } => {
                        (data.into_pyarray(py).into_any(), Some(offsets.into_pyarray(py)))
                    }
                };
                (values, str_offsets, offsets)
            })
            .collect();
        Ok(Some((cols, batch.rows, (batch.end.unit, batch.end.row))))
    }

    /// Stops the decoding threads now (also done when the reader is dropped).
    fn close(&self, py: Python<'_>) {
        py.detach(|| drop(self.reader.lock().unwrap_or_else(|e| e.into_inner()).take()));
    }
}
