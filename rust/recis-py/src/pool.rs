//! Pooling of looked-up rows into bags, forward and backward
//! (`recis_core::pool`).

use crate::{contiguous, value_err};
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2, PyReadwriteArray3};
use pyo3::prelude::*;

/// The bag layout of `pool_forward` / `pool_backward`, checked.
pub(crate) fn bags<'a>(
    inverse: &'a PyReadonlyArray1<'_, i64>,
    offsets: &'a PyReadonlyArray1<'_, i64>,
    weights: &'a Option<PyReadonlyArray1<'_, f32>>,
    mean: bool,
    features: usize,
    rows: usize,
) -> PyResult<recis_core::pool::Bags<'a>> {
    let (inverse, offsets) = (contiguous(inverse, "inverse")?, contiguous(offsets, "offsets")?);
    let weights = weights.as_ref().map(|a| contiguous(a, "weights")).transpose()?;
    recis_core::pool::Bags::new(inverse, offsets, weights, mean, features, rows).map_err(value_err)
}

/// Pools looked-up rows `w` ([rows, dim]) into `out` ([batch, features,
/// dim]): `recis_core::pool`. Bag `f * batch + b` spans
/// `offsets[k]..offsets[k + 1]` of `inverse` (and `weights`).
#[pyfunction]
#[pyo3(signature = (w, inverse, offsets, weights, mean, features, out))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_forward(
    py: Python<'_>,
    w: PyReadonlyArray2<'_, f32>,
    inverse: PyReadonlyArray1<'_, i64>,
    offsets: PyReadonlyArray1<'_, i64>,
    weights: Option<PyReadonlyArray1<'_, f32>>,
    mean: bool,
    features: usize,
    mut out: PyReadwriteArray3<'_, f32>,
) -> PyResult<()> {
    let (rows, dim) = w.as_array().dim();
    let w = w.as_slice().map_err(|_| value_err("w must be a contiguous [rows, dim] float32 array".into()))?;
    let out = out
        .as_slice_mut()
        .map_err(|_| value_err("out must be a contiguous [batch, features, dim] float32 array".into()))?;
    let bags = bags(&inverse, &offsets, &weights, mean, features, rows)?;
    py.detach(|| bags.forward(w, dim, out)).map_err(value_err)
}

/// The gradient of `pool_forward`'s `w`: written into `out` ([rows, dim])
/// from the pooled output's gradient `grad` ([batch, features, dim]).
#[pyfunction]
#[pyo3(signature = (grad, inverse, offsets, weights, mean, features, out))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_backward(
    py: Python<'_>,
    grad: PyReadonlyArray3<'_, f32>,
    inverse: PyReadonlyArray1<'_, i64>,
    offsets: PyReadonlyArray1<'_, i64>,
    weights: Option<PyReadonlyArray1<'_, f32>>,
    mean: bool,
    features: usize,
    mut out: PyReadwriteArray2<'_, f32>,
) -> PyResult<()> {
    let (rows, dim) = out.as_array().dim();
    let grad = grad.as_slice().map_err(|_| value_err("grad must be a contiguous float32 array".into()))?;
    let out = out.as_slice_mut().map_err(|_| value_err("out must be a contiguous [rows, dim] float32 array".into()))?;
    let bags = bags(&inverse, &offsets, &weights, mean, features, rows)?;
    py.detach(|| bags.backward(grad, dim, out)).map_err(value_err)
}
