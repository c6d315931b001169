//! Tables: `HashTable` (one Rust table), the lookups of several tables in
//! one call (`recis_core::pipeline`), the tickets they hand out, and the
//! de-duplication of id batches that travel (sharded training).

use crate::optim::{indices_u32, PyOptimizer};
use crate::{as_u64, contiguous, into_i64, params, same_len, to_py, value_err};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use recis_core::pipeline::{self, Request, Ticket};
use recis_core::{AdmissionPolicy, EvictionPolicy, EvictionScore, Initializer, Missing, TableConfig, NO_ROW};
use std::sync::Arc;

fn parse_initializer(kind: &str, p: &[f64], dim: usize) -> PyResult<Initializer> {
    Ok(match kind {
        "constant" => Initializer::Constant(params::<1>(kind, p)?[0] as f32),
        "uniform" => {
            let [low, high] = params(kind, p)?;
            Initializer::Uniform { low: low as f32, high: high as f32 }
        }
        "normal" => {
            let [mean, std] = params(kind, p)?;
            Initializer::Normal { mean: mean as f32, std: std as f32 }
        }
        "truncated_normal" => {
            let [mean, std, low, high] = params(kind, p)?;
            Initializer::TruncatedNormal { mean: mean as f32, std: std as f32, low: low as f32, high: high as f32 }
        }
        "xavier_uniform" => Initializer::xavier_uniform(dim, params::<1>(kind, p)?[0] as f32),
        "xavier_normal" => Initializer::xavier_normal(dim, params::<1>(kind, p)?[0] as f32),
        "kaiming_uniform" => Initializer::kaiming_uniform(dim, params::<1>(kind, p)?[0] as f32),
        "kaiming_normal" => Initializer::kaiming_normal(dim, params::<1>(kind, p)?[0] as f32),
        _ => return Err(value_err(format!("unknown initializer {kind:?}"))),
    })
}

fn parse_admission(kind: &str, p: &[f64]) -> PyResult<AdmissionPolicy> {
    Ok(match kind {
        "always" => AdmissionPolicy::Always,
        "min_count" => {
            let [k, width, depth, decay_every] = params(kind, p)?;
            AdmissionPolicy::MinCount {
                k: k as u32,
                width: width as usize,
                depth: depth as usize,
                decay_every: decay_every as u64,
            }
        }
        "probability" => AdmissionPolicy::Probability { p: params::<1>(kind, p)?[0] },
        _ => return Err(value_err(format!("unknown admission policy {kind:?}"))),
    })
}

#[pyclass(name = "HashTable", module = "recis._native", frozen)]
pub(crate) struct PyHashTable {
    table: Arc<recis_core::HashTable>,
}

#[pymethods]
impl PyHashTable {
    /// `namespace_seeds`: one initializer seed per namespace (id space) of
    /// the table; None: one namespace seeded by `seed`.
    #[new]
    #[pyo3(signature = (dim, initializer, init_params, seed, admission, admission_params, num_shards=256, initial_capacity=16384, namespace_seeds=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: usize,
        initializer: &str,
        init_params: Vec<f64>,
        seed: u64,
        admission: &str,
        admission_params: Vec<f64>,
        num_shards: usize,
        initial_capacity: usize,
        namespace_seeds: Option<Vec<u64>>,
    ) -> PyResult<Self> {
        let mut cfg = TableConfig::new(dim);
        cfg.initializer = parse_initializer(initializer, &init_params, dim.max(1))?;
        cfg.seed = seed;
        cfg.admission = parse_admission(admission, &admission_params)?;
        cfg.num_shards = num_shards;
        cfg.initial_capacity = initial_capacity;
        cfg.namespace_seeds = namespace_seeds.unwrap_or_default();
        let table = recis_core::HashTable::new(cfg).map_err(to_py)?;
        Ok(PyHashTable { table: Arc::new(table) })
    }

    #[getter]
    fn dim(&self) -> usize {
        self.table.dim()
    }

    #[getter]
    fn slot_width(&self, py: Python<'_>) -> usize {
        let t = &self.table;
        py.detach(|| t.slot_width())
    }

    #[getter]
    fn namespaces(&self) -> usize {
        self.table.namespaces()
    }

    #[classattr]
    const NO_ROW: u32 = NO_ROW;

    fn __len__(&self, py: Python<'_>) -> usize {
        let t = &self.table;
        py.detach(|| t.len())
    }

    /// Ids stored in namespace `ns`.
    fn len_in(&self, py: Python<'_>, ns: usize) -> PyResult<usize> {
        let t = &self.table;
        py.detach(|| t.len_in(ns)).map_err(to_py)
    }

    /// Distinct ids of a batch, inserting new ones: (ids, rows, inverse, counts).
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (ids, step, ns=0))]
    fn lookup_or_insert_unique<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        step: u64,
        ns: usize,
    ) -> PyResult<(
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<u32>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<u32>>,
    )> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let t = &self.table;
        let u = py.detach(|| t.lookup_or_insert_unique_in(ns, ids, step)).map_err(to_py)?;
        Ok(unique_to_py(py, u))
    }

    /// Distinct ids of a batch, read-only: (ids, rows, inverse, counts).
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (ids, ns=0))]
    fn lookup_unique<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        ns: usize,
    ) -> PyResult<(
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<u32>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<u32>>,
    )> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let t = &self.table;
        let u = py.detach(|| t.lookup_unique_in(ns, ids)).map_err(to_py)?;
        Ok(unique_to_py(py, u))
    }

    /// Per-position rows, inserting new ids.
    fn lookup_or_insert<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        step: u64,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let t = &self.table;
        Ok(py.detach(|| t.lookup_or_insert(ids, step)).map_err(to_py)?.into_pyarray(py))
    }

    /// Per-position rows, NO_ROW where absent; inserts nothing.
    #[pyo3(signature = (ids, ns=0))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        ns: usize,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let t = &self.table;
        Ok(py.detach(|| t.lookup_in(ns, ids)).map_err(to_py)?.into_pyarray(py))
    }

    /// Writes the embeddings of `rows` into `out` ([n, dim] float32); rows
    /// equal to NO_ROW read as zeros or, with `initial`, their initial value.
    #[pyo3(signature = (ids, rows, initial, out, ns=0))]
    fn gather(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        rows: PyReadonlyArray1<'_, u32>,
        initial: bool,
        mut out: PyReadwriteArray2<'_, f32>,
        ns: usize,
    ) -> PyResult<()> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let rows = contiguous(&rows, "rows")?;
        let out =
            out.as_slice_mut().map_err(|_| value_err("out must be a contiguous [n, dim] float32 array".into()))?;
        let missing = if initial { Missing::Initial } else { Missing::Zeros };
        let t = &self.table;
        py.detach(|| t.gather_in(ns, ids, rows, missing, out)).map_err(to_py)
    }

    /// Writes the would-be initial embedding of each id into `out`.
    #[pyo3(signature = (ids, out, ns=0))]
    fn initial_values(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        mut out: PyReadwriteArray2<'_, f32>,
        ns: usize,
    ) -> PyResult<()> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let out =
            out.as_slice_mut().map_err(|_| value_err("out must be a contiguous [n, dim] float32 array".into()))?;
        let t = &self.table;
        py.detach(|| t.initial_values_in(ns, ids, out)).map_err(to_py)
    }

    fn set_slots(&self, py: Python<'_>, slot_width: usize, slot_init: f32) -> PyResult<()> {
        let t = &self.table;
        py.detach(|| t.set_slots(slot_width, slot_init)).map_err(to_py)
    }

    /// One fused optimizer step over `rows` with gradients `grads` [n, dim].
    fn apply_gradients(
        &self,
        py: Python<'_>,
        rows: PyReadonlyArray1<'_, u32>,
        grads: PyReadonlyArray2<'_, f32>,
        optimizer: &PyOptimizer,
        lr: f32,
        step: u64,
    ) -> PyResult<()> {
        let rows = contiguous(&rows, "rows")?;
        let grads =
            grads.as_slice().map_err(|_| value_err("grads must be a contiguous [n, dim] float32 array".into()))?;
        let t = &self.table;
        let opt = &optimizer.opt;
        py.detach(|| t.apply_gradients(rows, grads, opt, lr, step)).map_err(to_py)
    }

    /// One fused optimizer step with gradients per lookup position:
    /// `grads[k]` ([n, dim]) belongs to `rows[index[k]]` (rows may repeat).
    #[allow(clippy::too_many_arguments)]
    fn apply_gradients_indexed(
        &self,
        py: Python<'_>,
        rows: PyReadonlyArray1<'_, u32>,
        index: PyReadonlyArray1<'_, i64>,
        grads: PyReadonlyArray2<'_, f32>,
        optimizer: &PyOptimizer,
        lr: f32,
        step: u64,
    ) -> PyResult<()> {
        let rows = contiguous(&rows, "rows")?;
        let index = contiguous(&index, "index")?;
        let grads =
            grads.as_slice().map_err(|_| value_err("grads must be a contiguous [n, dim] float32 array".into()))?;
        let t = &self.table;
        let opt = &optimizer.opt;
        py.detach(|| t.apply_gradients_indexed(rows, &indices_u32(index)?, grads, opt, lr, step)).map_err(to_py)
    }

    /// Evicts ids by the given criteria; returns the evicted ids and their
    /// namespaces.
    #[pyo3(signature = (step, ttl_steps=None, min_frequency=None, max_rows=None, score="lru", min_l2_norm=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn evict<'py>(
        &self,
        py: Python<'py>,
        step: u64,
        ttl_steps: Option<u64>,
        min_frequency: Option<u32>,
        max_rows: Option<usize>,
        score: &str,
        min_l2_norm: Option<f32>,
    ) -> PyResult<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<u32>>)> {
        let score = match score {
            "lru" => EvictionScore::Lru,
            "lfu" => EvictionScore::Lfu,
            _ => return Err(value_err(format!("eviction score must be 'lru' or 'lfu', got {score:?}"))),
        };
        let policy = EvictionPolicy { ttl_steps, min_frequency, max_rows, score, min_l2_norm };
        let t = &self.table;
        let (ns, ids): (Vec<u32>, Vec<u64>) = py.detach(|| t.evict_entries(&policy, step)).into_iter().unzip();
        Ok((into_i64(ids).into_pyarray(py), ns.into_pyarray(py)))
    }

    /// Removes the ids of namespace `ns` that the table holds; how many.
    fn remove_ids(&self, py: Python<'_>, ids: PyReadonlyArray1<'_, i64>, ns: usize) -> PyResult<usize> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let t = &self.table;
        py.detach(|| t.remove_in(ns, ids)).map_err(to_py)
    }

    /// Snapshot of every (id, row, namespace), namespace by namespace.
    #[allow(clippy::type_complexity)]
    fn export_keys<'py>(
        &self,
        py: Python<'py>,
    ) -> (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u32>>) {
        let t = &self.table;
        let (ids, rows, ns) = py.detach(|| t.export_entries());
        (into_i64(ids).into_pyarray(py), rows.into_pyarray(py), ns.into_pyarray(py))
    }

    /// Full rows (embedding + slots) and metadata (frequency, last step).
    #[allow(clippy::type_complexity)]
    fn read_rows<'py>(
        &self,
        py: Python<'py>,
        rows: PyReadonlyArray1<'py, u32>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u32>>)> {
        let rows = contiguous(&rows, "rows")?;
        let w = self.table.dim() + self.table.slot_width();
        let t = &self.table;
        let (values, freq, last) = py
            .detach(|| {
                let mut values = vec![0.0f32; rows.len() * w];
                let (mut f, mut l) = (vec![0u32; rows.len()], vec![0u32; rows.len()]);
                t.read_rows(rows, &mut values, &mut f, &mut l).map(|_| (values, f, l))
            })
            .map_err(to_py)?;
        let values = Array2::from_shape_vec((rows.len(), w), values).expect("shape matches length");
        Ok((values.into_pyarray(py), freq.into_pyarray(py), last.into_pyarray(py)))
    }

    /// Inserts or overwrites full rows with their metadata (bypasses admission).
    #[pyo3(signature = (ids, values, frequency, last_step, ns=0))]
    fn import_rows(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        values: PyReadonlyArray2<'_, f32>,
        frequency: PyReadonlyArray1<'_, u32>,
        last_step: PyReadonlyArray1<'_, u32>,
        ns: usize,
    ) -> PyResult<()> {
        let ids = as_u64(contiguous(&ids, "ids")?);
        let values =
            values.as_slice().map_err(|_| value_err("values must be a contiguous 2-D float32 array".into()))?;
        let f = contiguous(&frequency, "frequency")?;
        let l = contiguous(&last_step, "last_step")?;
        let t = &self.table;
        py.detach(|| t.import_in(ns, ids, values, f, l)).map_err(to_py)
    }

    fn clear(&self, py: Python<'_>) {
        let t = &self.table;
        py.detach(|| t.clear())
    }

    /// Admission sketch counters and last decay epoch.
    fn admission_state<'py>(&self, py: Python<'py>) -> (Bound<'py, PyArray1<u32>>, u32) {
        let (c, e) = self.table.admission_state();
        (c.into_pyarray(py), e)
    }

    fn set_admission_state(
        &self,
        py: Python<'_>,
        counters: PyReadonlyArray1<'_, u32>,
        last_decay_epoch: u32,
    ) -> PyResult<()> {
        let c = contiguous(&counters, "counters")?;
        let t = &self.table;
        py.detach(|| t.set_admission_state(c, last_decay_epoch)).map_err(to_py)
    }

    /// Size and memory use.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = &self.table;
        let s = py.detach(|| t.stats());
        let d = PyDict::new(py);
        d.set_item("len", s.len)?;
        d.set_item("id_map_slots", s.id_map_slots)?;
        d.set_item("rows_allocated", s.rows_allocated)?;
        d.set_item("free_rows", s.free_rows)?;
        d.set_item("id_map_bytes", s.id_map_bytes)?;
        d.set_item("row_bytes", s.row_bytes)?;
        d.set_item("meta_bytes", s.meta_bytes)?;
        d.set_item("other_bytes", s.other_bytes)?;
        d.set_item("reserved_bytes", s.reserved_bytes)?;
        d.set_item("total_bytes", s.total_bytes())?;
        d.set_item("overhead_bytes_per_id", s.overhead_bytes_per_id())?;
        Ok(d)
    }
}

#[allow(clippy::type_complexity)]
fn unique_to_py(
    py: Python<'_>,
    u: recis_core::UniqueLookup,
) -> (Bound<'_, PyArray1<i64>>, Bound<'_, PyArray1<u32>>, Bound<'_, PyArray1<i64>>, Bound<'_, PyArray1<u32>>) {
    let inverse: Vec<i64> = u.inverse.iter().map(|&i| i as i64).collect();
    (into_i64(u.ids).into_pyarray(py), u.rows.into_pyarray(py), inverse.into_pyarray(py), u.counts.into_pyarray(py))
}

/// The rows a trainable lookup handed out (`recis_core::pipeline::Ticket`):
/// opaque to Python, which passes it back to `apply_gradients_many`.
#[pyclass(name = "Ticket", module = "recis._native", frozen)]
pub(crate) struct PyTicket {
    pub(crate) ticket: Arc<Ticket>,
}

#[pymethods]
impl PyTicket {
    fn __len__(&self) -> usize {
        self.ticket.len()
    }

    /// A copy of the rows.
    fn rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        self.ticket.rows().to_vec().into_pyarray(py)
    }
}

/// The pipeline requests of parallel argument lists.
fn requests<'a>(
    ts: &'a [Arc<recis_core::HashTable>],
    ns: &[usize],
    ids: &[&'a [u64]],
    steps: &[u64],
    insert: &[bool],
    initial: &[bool],
) -> Vec<Request<'a>> {
    (0..ts.len())
        .map(|i| {
            let r =
                Request::new(&ts[i], ns[i], ids[i]).missing(if initial[i] { Missing::Initial } else { Missing::Zeros });
            if insert[i] {
                r.insert(steps[i])
            } else {
                r
            }
        })
        .collect()
}

pub(crate) fn native_tables(tables: &[Bound<'_, PyHashTable>]) -> Vec<Arc<recis_core::HashTable>> {
    tables.iter().map(|t| t.get().table.clone()).collect()
}

/// `recis_core::pipeline::lookup_many`: the lookups (inserting where
/// `insert[i]`) of several (table, namespace) pairs in one call. Returns
/// (ids, rows, inverse, counts) for each.
#[pyfunction]
#[allow(clippy::type_complexity)]
#[pyo3(signature = (tables, ids, steps, insert, namespaces=None))]
pub(crate) fn lookup_unique_many<'py>(
    py: Python<'py>,
    tables: Vec<Bound<'py, PyHashTable>>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    steps: Vec<u64>,
    insert: Vec<bool>,
    namespaces: Option<Vec<usize>>,
) -> PyResult<
    Vec<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<u32>>)>,
> {
    let n = tables.len();
    let ns = namespaces.unwrap_or_else(|| vec![0; n]);
    for (len, what) in [(ids.len(), "ids"), (steps.len(), "steps"), (insert.len(), "insert"), (ns.len(), "namespaces")]
    {
        same_len(n, len, what)?;
    }
    let ts = native_tables(&tables);
    let ids: Vec<&[u64]> = ids.iter().map(|a| contiguous(a, "ids").map(as_u64)).collect::<PyResult<_>>()?;
    let reqs = requests(&ts, &ns, &ids, &steps, &insert, &vec![false; n]);
    let found = py.detach(|| pipeline::lookup_many(&reqs)).map_err(to_py)?;
    Ok(found.into_iter().map(|u| unique_to_py(py, u)).collect())
}

/// `recis_core::pipeline::lookup_gather`: the lookups and the gather of
/// their distinct rows into one `[U, dim]` block (missing rows as zeros, or
/// their initial values where `initial`). Returns (block, inverse into the
/// block for every position of every request in order, each request's
/// rows, each request's number of distinct ids, and (first, end, Ticket)
/// for each run of trainable requests of one table).
#[pyfunction]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(crate) fn lookup_gather_many<'py>(
    py: Python<'py>,
    tables: Vec<Bound<'py, PyHashTable>>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    steps: Vec<u64>,
    insert: Vec<bool>,
    namespaces: Vec<usize>,
    initial: Vec<bool>,
) -> PyResult<(
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<i64>>,
    Vec<Bound<'py, PyArray1<u32>>>,
    Vec<usize>,
    Vec<(usize, usize, PyTicket)>,
)> {
    let n = tables.len();
    for (len, what) in [
        (ids.len(), "ids"),
        (steps.len(), "steps"),
        (insert.len(), "insert"),
        (namespaces.len(), "namespaces"),
        (initial.len(), "initial"),
    ] {
        same_len(n, len, what)?;
    }
    let ts = native_tables(&tables);
    let ids: Vec<&[u64]> = ids.iter().map(|a| contiguous(a, "ids").map(as_u64)).collect::<PyResult<_>>()?;
    let reqs = requests(&ts, &namespaces, &ids, &steps, &insert, &initial);
    let block = py.detach(|| pipeline::lookup_gather(&reqs)).map_err(to_py)?;
    let dim = ts[0].dim();
    let sizes: Vec<usize> = block.found.iter().map(|u| u.rows.len()).collect();
    let rows = block.found.into_iter().map(|u| u.rows.into_pyarray(py)).collect();
    let values = Array2::from_shape_vec((sizes.iter().sum(), dim), block.values).expect("block shape").into_pyarray(py);
    let runs = block.runs.into_iter().map(|(a, b, t)| (a, b, PyTicket { ticket: Arc::new(t) })).collect();
    Ok((values, block.inverse.into_pyarray(py), rows, sizes, runs))
}

/// The distinct ids of each batch, the batches in parallel:
/// `recis_core::dedup::distinct`. One (ids, inverse, counts) a batch, in
/// order of first appearance.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub(crate) fn distinct_many<'py>(
    py: Python<'py>,
    batches: Vec<PyReadonlyArray1<'py, i64>>,
) -> PyResult<Vec<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>)>> {
    let batches: Vec<&[u64]> = batches.iter().map(|b| contiguous(b, "ids").map(as_u64)).collect::<PyResult<_>>()?;
    let found = py.detach(|| recis_core::dedup::distinct_many(&batches)).map_err(value_err)?;
    let wide = |v: Vec<u32>| v.into_iter().map(i64::from).collect::<Vec<i64>>();
    Ok(found
        .into_iter()
        .map(|d| (into_i64(d.ids).into_pyarray(py), wide(d.inverse).into_pyarray(py), wide(d.counts).into_pyarray(py)))
        .collect())
}
