//! Sparse optimizers: the parsed kernel and the update of several tables
//! in one call (`recis_core::pipeline::apply_many`).

use crate::table::{native_tables, PyHashTable, PyTicket};
use crate::{contiguous, params, same_len, to_py, value_err};
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::prelude::*;
use recis_core::pipeline::{self, PooledPart, Rows, Ticket, Update};
use recis_core::{SparseOptimizer, TableError};
use std::sync::Arc;

fn parse_optimizer(kind: &str, p: &[f64]) -> PyResult<SparseOptimizer> {
    let f = |x: f64| x as f32;
    let opt = match kind {
        "sgd" => SparseOptimizer::Sgd { weight_decay: f(params::<1>(kind, p)?[0]) },
        "adagrad" => {
            let [lr_decay, eps, init, wd] = params(kind, p)?;
            SparseOptimizer::Adagrad {
                lr_decay: f(lr_decay),
                eps: f(eps),
                initial_accumulator: f(init),
                weight_decay: f(wd),
            }
        }
        "rowwise_adagrad" => {
            let [eps, init, wd] = params(kind, p)?;
            SparseOptimizer::RowWiseAdagrad { eps: f(eps), initial_accumulator: f(init), weight_decay: f(wd) }
        }
        "adam" => {
            let [b1, b2, eps, wd] = params(kind, p)?;
            SparseOptimizer::Adam { beta1: f(b1), beta2: f(b2), eps: f(eps), weight_decay: f(wd) }
        }
        "adamw" => {
            let [b1, b2, eps, wd] = params(kind, p)?;
            SparseOptimizer::AdamW { beta1: f(b1), beta2: f(b2), eps: f(eps), weight_decay: f(wd) }
        }
        _ => return Err(value_err(format!("unknown sparse optimizer {kind:?}"))),
    };
    opt.validate().map_err(|m| value_err(format!("{}: {m}", opt.name())))?;
    Ok(opt)
}

/// A parsed sparse optimizer, reused across steps.
#[pyclass(name = "SparseOptimizerKernel", module = "recis._native", frozen)]
pub(crate) struct PyOptimizer {
    pub(crate) opt: SparseOptimizer,
}

#[pymethods]
impl PyOptimizer {
    #[new]
    fn new(kind: &str, params: Vec<f64>) -> PyResult<Self> {
        Ok(PyOptimizer { opt: parse_optimizer(kind, &params)? })
    }

    /// (slot values per row, their initial value) for an embedding of `dim`.
    fn slot_layout(&self, dim: usize) -> (usize, f32) {
        (self.opt.slot_width(dim), self.opt.slot_init())
    }
}

/// Gradient-row indices as the core takes them (u32); one out of range is
/// an error naming its position.
pub(crate) fn indices_u32(index: &[i64]) -> Result<Vec<u32>, TableError> {
    index
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            u32::try_from(i).map_err(|_| TableError::InvalidArgument(format!("index[{k}] = {i} is out of range")))
        })
        .collect()
}

/// What `apply_gradients_many` takes as a table's rows.
enum RowsArg<'py> {
    Tickets(Vec<Arc<Ticket>>),
    Any(PyReadonlyArray1<'py, u32>),
}

/// `recis_core::pipeline::apply_many`: one optimizer step for each table,
/// the tables in parallel. `rows[i]` is a list of Tickets (the table's
/// lookups since the last step, in order) or a uint32 array of rows.
/// Returns one entry per table: None, or the error that left it unchanged.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_gradients_many<'py>(
    py: Python<'py>,
    tables: Vec<Bound<'py, PyHashTable>>,
    rows: Vec<Bound<'py, PyAny>>,
    index: Vec<PyReadonlyArray1<'py, i64>>,
    grads: Vec<PyReadonlyArray2<'py, f32>>,
    optimizer: &PyOptimizer,
    lr: f32,
    steps: Vec<u64>,
) -> PyResult<Vec<Option<String>>> {
    let n = tables.len();
    for (len, what) in [(rows.len(), "rows"), (index.len(), "index"), (grads.len(), "grads"), (steps.len(), "steps")] {
        same_len(n, len, what)?;
    }
    let ts = native_tables(&tables);
    let rows: Vec<RowsArg> =
        rows.iter()
            .map(|r| match r.extract::<Vec<Bound<'py, PyTicket>>>() {
                Ok(tickets) => Ok(RowsArg::Tickets(tickets.iter().map(|t| t.get().ticket.clone()).collect())),
                Err(_) => r.extract::<PyReadonlyArray1<'py, u32>>().map(RowsArg::Any).map_err(|_| {
                    value_err("rows: each entry must be a list of Tickets or a uint32 array of rows".into())
                }),
            })
            .collect::<PyResult<_>>()?;
    let index: Vec<Vec<u32>> = index
        .iter()
        .map(|a| contiguous(a, "index").and_then(|ix| indices_u32(ix).map_err(to_py)))
        .collect::<PyResult<_>>()?;
    let grads: Vec<&[f32]> = grads
        .iter()
        .map(|g| g.as_slice().map_err(|_| value_err("grads must be contiguous [n, dim] float32 arrays".into())))
        .collect::<PyResult<_>>()?;
    let tickets: Vec<Vec<&Ticket>> = rows
        .iter()
        .map(|r| match r {
            RowsArg::Tickets(ts) => ts.iter().map(|t| &**t).collect(),
            RowsArg::Any(_) => Vec::new(),
        })
        .collect();
    let updates: Vec<Update> = (0..n)
        .map(|i| {
            let rows = match &rows[i] {
                RowsArg::Tickets(_) => Ok(Rows::Tickets(&tickets[i])),
                RowsArg::Any(a) => contiguous(a, "rows").map(Rows::Any),
            }?;
            Ok(Update { table: &ts[i], rows, index: &index[i], grads: grads[i], step: steps[i] })
        })
        .collect::<PyResult<_>>()?;
    let opt = &optimizer.opt;
    let done = py.detach(|| pipeline::apply_many(&updates, opt, lr));
    Ok(done.into_iter().map(|r| r.err().map(|e| e.to_string())).collect())
}

/// `recis_core::pipeline::apply_pooled`: the optimizer update of several
/// tables' rows of a pooled block, fused with the pooling's backward (an
/// optimizer in backward). `grad` is the pooled output's gradient
/// ([batch, features, dim]); the bags are those of `pool_forward` over a
/// block of `rows` rows. Part `i`: table `tables[i]`'s ticket `tickets[i]`
/// (of that block), updated by `kernels[i]` at `lrs[i]`, step `steps[i]`. Returns one entry
/// per part: None, or the error that left its table unchanged.
#[pyfunction]
#[pyo3(signature = (grad, inverse, offsets, weights, mean, features, rows, tables, tickets, kernels, lrs, steps))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_pooled<'py>(
    py: Python<'py>,
    grad: PyReadonlyArray3<'py, f32>,
    inverse: PyReadonlyArray1<'py, i64>,
    offsets: PyReadonlyArray1<'py, i64>,
    weights: Option<PyReadonlyArray1<'py, f32>>,
    mean: bool,
    features: usize,
    rows: usize,
    tables: Vec<Bound<'py, PyHashTable>>,
    tickets: Vec<Bound<'py, PyTicket>>,
    kernels: Vec<Bound<'py, PyOptimizer>>,
    lrs: Vec<f32>,
    steps: Vec<u64>,
) -> PyResult<Vec<Option<String>>> {
    let n = tables.len();
    for (len, what) in
        [(tickets.len(), "tickets"), (kernels.len(), "kernels"), (lrs.len(), "lrs"), (steps.len(), "steps")]
    {
        same_len(n, len, what)?;
    }
    let dim = grad.as_array().dim().2;
    let grad = grad.as_slice().map_err(|_| value_err("grad must be a contiguous float32 array".into()))?;
    let bags = crate::pool::bags(&inverse, &offsets, &weights, mean, features, rows)?;
    let ts = native_tables(&tables);
    let tks: Vec<Arc<Ticket>> = tickets.iter().map(|t| t.get().ticket.clone()).collect();
    let parts: Vec<PooledPart> = (0..n)
        .map(|i| PooledPart { table: &ts[i], ticket: &tks[i], opt: &kernels[i].get().opt, lr: lrs[i], step: steps[i] })
        .collect();
    let done = py.detach(|| pipeline::apply_pooled(&bags, grad, dim, &parts));
    Ok(done.into_iter().map(|r| r.err().map(|e| e.to_string())).collect())
}
