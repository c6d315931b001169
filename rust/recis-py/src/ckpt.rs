//! Checkpoint integrity (`recis_core::ckpt`): checksums and safetensors
//! header checks. The messages name the reason, the caller names the file.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use recis_core::ckpt::{self as core, CkptError};
use std::path::PathBuf;

fn ckpt_err(e: CkptError) -> PyErr {
    match e {
        CkptError::Io(_) => PyOSError::new_err(e.to_string()),
        CkptError::Invalid(_) => PyValueError::new_err(e.to_string()),
    }
}

/// The name of the checksum algorithm (recorded beside each digest).
#[pyfunction]
pub(crate) fn checksum_algorithm() -> &'static str {
    core::CHECKSUM_ALGORITHM
}

/// A file's digest, hex.
#[pyfunction]
pub(crate) fn checksum_file(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| core::checksum_file(&path)).map_err(ckpt_err)
}

/// The digest of bytes, hex (the same as `checksum_file` of a file holding them).
#[pyfunction]
pub(crate) fn checksum_bytes(py: Python<'_>, data: &[u8]) -> String {
    py.detach(|| core::checksum_bytes(data))
}

/// A safetensors file's validated header: ([(name, dtype, shape)] in the
/// order of their data, {metadata}). ValueError names what is wrong.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub(crate) fn check_safetensors_file(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(Vec<(String, &'static str, Vec<u64>)>, Vec<(String, String)>)> {
    let header = py.detach(|| core::check_safetensors_file(&path)).map_err(ckpt_err)?;
    let tensors = header.tensors.into_iter().map(|t| (t.name, t.dtype.name(), t.shape)).collect();
    Ok((tensors, header.metadata))
}
