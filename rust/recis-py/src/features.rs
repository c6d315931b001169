//! Feature ops over several features in one call (`recis_core::features`'s
//! `*_many`): the features in parallel, each checked first.

use crate::{contiguous, slices, value_err};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::prelude::*;
use recis_core::features;

type Ids<'py> = Vec<Bound<'py, PyArray1<i64>>>;

fn to_arrays(py: Python<'_>, outs: Vec<Vec<i64>>) -> Ids<'_> {
    outs.into_iter().map(|o| o.into_pyarray(py)).collect()
}

/// FarmHash Fingerprint64 of bytes.
#[pyfunction]
pub(crate) fn fingerprint64(data: &[u8]) -> u64 {
    features::fingerprint64(data)
}

#[pyfunction]
pub(crate) fn hash_strings_many<'py>(
    py: Python<'py>,
    columns: Vec<(PyReadonlyArray1<'py, u8>, PyReadonlyArray1<'py, i64>)>,
    buckets: Vec<u64>,
) -> PyResult<Ids<'py>> {
    let cols = columns
        .iter()
        .map(|(b, o)| Ok(features::Strings { bytes: contiguous(b, "bytes")?, offsets: contiguous(o, "str_offsets")? }))
        .collect::<PyResult<Vec<_>>>()?;
    let outs = py.detach(|| features::hash_strings_many(&cols, &buckets)).map_err(value_err)?;
    Ok(to_arrays(py, outs))
}

#[pyfunction]
pub(crate) fn hash_ids_many<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    buckets: Vec<u64>,
) -> PyResult<Ids<'py>> {
    let xs = slices(&ids, "ids")?;
    let outs = py.detach(|| features::hash_ids_many(&xs, &buckets)).map_err(value_err)?;
    Ok(to_arrays(py, outs))
}

#[pyfunction]
pub(crate) fn mod_many<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    mods: Vec<u64>,
) -> PyResult<Ids<'py>> {
    let xs = slices(&ids, "ids")?;
    let outs = py.detach(|| features::mod_many(&xs, &mods)).map_err(value_err)?;
    Ok(to_arrays(py, outs))
}

#[pyfunction]
pub(crate) fn multi_hash_many<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    buckets: Vec<Vec<u64>>,
) -> PyResult<Vec<Bound<'py, PyArray2<i64>>>> {
    let xs = slices(&ids, "ids")?;
    let outs = py.detach(|| features::multi_hash_many(&xs, &buckets)).map_err(value_err)?;
    Ok(outs
        .into_iter()
        .zip(&buckets)
        .map(|(o, b)| Array2::from_shape_vec((o.len() / b.len(), b.len()), o).expect("rows x k").into_pyarray(py))
        .collect())
}

#[pyfunction]
pub(crate) fn bucketize_many<'py>(
    py: Python<'py>,
    values: Vec<PyReadonlyArray1<'py, f64>>,
    boundaries: Vec<PyReadonlyArray1<'py, f64>>,
) -> PyResult<Ids<'py>> {
    let xs = slices(&values, "values")?;
    let bs = slices(&boundaries, "boundaries")?;
    let outs = py.detach(|| features::bucketize_many(&xs, &bs)).map_err(value_err)?;
    Ok(to_arrays(py, outs))
}

/// (values, offsets) of a ragged result.
type RaggedOut<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

type RaggedPair<'py> =
    (PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>);

fn to_ragged(py: Python<'_>, outs: Vec<(Vec<i64>, Vec<i64>)>) -> Vec<RaggedOut<'_>> {
    outs.into_iter().map(|(v, o)| (v.into_pyarray(py), o.into_pyarray(py))).collect()
}

#[pyfunction]
pub(crate) fn cross_many<'py>(
    py: Python<'py>,
    pairs: Vec<RaggedPair<'py>>,
    buckets: Vec<u64>,
) -> PyResult<Vec<RaggedOut<'py>>> {
    let xs = pairs
        .iter()
        .map(|(av, ao, bv, bo)| {
            let a = (contiguous(av, "a values")?, contiguous(ao, "a offsets")?);
            let b = (contiguous(bv, "b values")?, contiguous(bo, "b offsets")?);
            Ok((a, b))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let outs = py.detach(|| features::cross_many(&xs, &buckets)).map_err(value_err)?;
    Ok(to_ragged(py, outs))
}

/// For each ragged feature: (index of the kept elements, new offsets).
#[pyfunction]
pub(crate) fn truncate_many<'py>(
    py: Python<'py>,
    offsets: Vec<PyReadonlyArray1<'py, i64>>,
    max_lens: Vec<usize>,
    keep_first: Vec<bool>,
) -> PyResult<Vec<RaggedOut<'py>>> {
    let os = slices(&offsets, "offsets")?;
    let outs = py.detach(|| features::truncate_many(&os, &max_lens, &keep_first)).map_err(value_err)?;
    Ok(to_ragged(py, outs))
}
