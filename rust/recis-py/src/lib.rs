//! `recis._native`: thin PyO3 bindings of recis-core. Argument conversion,
//! GIL release and error mapping only — every rule lives in recis-core.
//!
//! Ids cross as int64 arrays and are reinterpreted as u64 bit for bit (so
//! negative ids are valid keys); row indices cross as uint32 arrays, with
//! `NO_ROW` (2**32 - 1) for an id without a row.

use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2,
    PyReadwriteArray3,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rayon::prelude::*;
use recis_core::pipeline::{self, Request, Rows, Ticket, Update};
use recis_core::{
    AdmissionPolicy, EvictionPolicy, EvictionScore, Initializer, Missing, SparseOptimizer, TableConfig, TableError,
    NO_ROW,
};
use std::sync::Arc;

fn to_py(e: TableError) -> PyErr {
    match e {
        TableError::InvalidArgument(m) => PyValueError::new_err(m),
        TableError::Full => PyMemoryError::new_err(e.to_string()),
        TableError::Stalled(m) => PyRuntimeError::new_err(m),
    }
}

fn value_err(m: String) -> PyErr {
    PyValueError::new_err(m)
}

fn contiguous<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| value_err(format!("{name} must be a contiguous 1-D array")))
}

fn as_u64(ids: &[i64]) -> &[u64] {
    // SAFETY: i64 and u64 have the same size and alignment, and every bit
    // pattern is valid for both.
    unsafe { std::slice::from_raw_parts(ids.as_ptr() as *const u64, ids.len()) }
}

fn into_i64(v: Vec<u64>) -> Vec<i64> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same size and alignment; the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut i64, v.len(), v.capacity()) }
}

fn params<const N: usize>(kind: &str, p: &[f64]) -> PyResult<[f64; N]> {
    p.try_into().map_err(|_| value_err(format!("{kind} takes {N} parameters, got {}", p.len())))
}

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
struct PyOptimizer {
    opt: SparseOptimizer,
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

#[pyclass(name = "HashTable", module = "recis._native", frozen)]
struct PyHashTable {
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

// ----------------------------------------------------------------------------
// Feature ops: each `*_many` runs one op over a list of features in one call,
// in parallel across features (and across chunks inside each).

use recis_core::features;

fn slices<'a, T: numpy::Element>(xs: &'a [PyReadonlyArray1<'_, T>], name: &str) -> PyResult<Vec<&'a [T]>> {
    xs.iter().enumerate().map(|(k, a)| contiguous(a, &format!("{name}[{k}]"))).collect()
}

fn same_len(a: usize, b: usize, what: &str) -> PyResult<()> {
    if a != b {
        return Err(value_err(format!("{what}: {a} inputs but {b} parameters")));
    }
    Ok(())
}

fn check_ragged(offsets: &[i64], values_len: usize, name: &str) -> PyResult<()> {
    if offsets.is_empty() || offsets[0] != 0 || *offsets.last().unwrap() as usize != values_len {
        return Err(value_err(format!(
            "{name}: offsets must start at 0 and end at the number of values ({values_len})"
        )));
    }
    if offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(value_err(format!("{name}: offsets must be non-decreasing")));
    }
    Ok(())
}

/// FarmHash Fingerprint64 of bytes.
#[pyfunction]
fn fingerprint64(data: &[u8]) -> u64 {
    features::fingerprint64(data)
}

#[pyfunction]
fn hash_strings_many<'py>(
    py: Python<'py>,
    columns: Vec<(PyReadonlyArray1<'py, u8>, PyReadonlyArray1<'py, i64>)>,
    buckets: Vec<u64>,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    same_len(columns.len(), buckets.len(), "hash_strings_many")?;
    let mut cols = Vec::with_capacity(columns.len());
    for (k, (b, o)) in columns.iter().enumerate() {
        let s = features::Strings { bytes: contiguous(b, "bytes")?, offsets: contiguous(o, "str_offsets")? };
        s.validate().map_err(|m| value_err(format!("strings[{k}]: {m}")))?;
        cols.push(s);
    }
    Ok(map_many(py, &cols, &buckets, |s| s.len(), |s, &b, o| features::hash_strings(*s, b, o)))
}

/// Runs `f(input, param, out)` for every (input, param) in parallel, `out`
/// being `len(input)` ids.
fn map_many<'py, I: Sync, P: Sync>(
    py: Python<'py>,
    inputs: &[I],
    params: &[P],
    len: impl Fn(&I) -> usize + Sync,
    f: impl Fn(&I, &P, &mut [i64]) + Sync,
) -> Vec<Bound<'py, PyArray1<i64>>> {
    let outs: Vec<Vec<i64>> = py.detach(|| {
        inputs
            .par_iter()
            .zip(params.par_iter())
            .map(|(x, p)| {
                let mut out = vec![0i64; len(x)];
                f(x, p, &mut out);
                out
            })
            .collect()
    });
    outs.into_iter().map(|o| o.into_pyarray(py)).collect()
}

#[pyfunction]
fn hash_ids_many<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    buckets: Vec<u64>,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    same_len(ids.len(), buckets.len(), "hash_ids_many")?;
    let xs = slices(&ids, "ids")?;
    Ok(map_many(py, &xs, &buckets, |x| x.len(), |x, &b, o| features::hash_ids(x, b, o)))
}

#[pyfunction]
fn mod_many<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    mods: Vec<u64>,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    same_len(ids.len(), mods.len(), "mod_many")?;
    if let Some(k) = mods.iter().position(|&m| m == 0) {
        return Err(value_err(format!("mods[{k}]: mod must be >= 1")));
    }
    let xs = slices(&ids, "ids")?;
    Ok(map_many(py, &xs, &mods, |x| x.len(), |x, &m, o| features::modulo(x, m, o)))
}

#[pyfunction]
fn multi_hash_many<'py>(
    py: Python<'py>,
    ids: Vec<PyReadonlyArray1<'py, i64>>,
    buckets: Vec<Vec<u64>>,
) -> PyResult<Vec<Bound<'py, PyArray2<i64>>>> {
    same_len(ids.len(), buckets.len(), "multi_hash_many")?;
    if let Some(k) = buckets.iter().position(|b| b.is_empty() || b.contains(&0)) {
        return Err(value_err(format!("buckets[{k}]: needs at least one bucket count, each >= 1")));
    }
    let xs = slices(&ids, "ids")?;
    let outs: Vec<Vec<i64>> = py.detach(|| {
        xs.par_iter()
            .zip(buckets.par_iter())
            .map(|(x, b)| {
                let mut out = vec![0i64; x.len() * b.len()];
                features::multi_hash(x, b, &mut out);
                out
            })
            .collect()
    });
    Ok(outs
        .into_iter()
        .zip(&buckets)
        .map(|(o, b)| Array2::from_shape_vec((o.len() / b.len(), b.len()), o).expect("rows x k").into_pyarray(py))
        .collect())
}

#[pyfunction]
fn bucketize_many<'py>(
    py: Python<'py>,
    values: Vec<PyReadonlyArray1<'py, f64>>,
    boundaries: Vec<PyReadonlyArray1<'py, f64>>,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    same_len(values.len(), boundaries.len(), "bucketize_many")?;
    let xs = slices(&values, "values")?;
    let bs = slices(&boundaries, "boundaries")?;
    for (k, b) in bs.iter().enumerate() {
        if b.iter().any(|x| x.is_nan()) || b.windows(2).any(|w| w[0] > w[1]) {
            return Err(value_err(format!("boundaries[{k}] must be sorted and free of NaN")));
        }
    }
    Ok(map_many(py, &xs, &bs, |x| x.len(), |x, b, o| features::bucketize(x, b, o)))
}

/// (values, offsets) of a ragged result.
type RaggedOut<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

type RaggedPair<'py> =
    (PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>);

#[pyfunction]
fn cross_many<'py>(py: Python<'py>, pairs: Vec<RaggedPair<'py>>, buckets: Vec<u64>) -> PyResult<Vec<RaggedOut<'py>>> {
    same_len(pairs.len(), buckets.len(), "cross_many")?;
    let mut xs = Vec::with_capacity(pairs.len());
    for (av, ao, bv, bo) in pairs.iter() {
        let (av, ao) = (contiguous(av, "a values")?, contiguous(ao, "a offsets")?);
        let (bv, bo) = (contiguous(bv, "b values")?, contiguous(bo, "b offsets")?);
        xs.push(((av, ao), (bv, bo)));
    }
    let outs: Vec<(Vec<i64>, Vec<i64>)> = py
        .detach(|| {
            xs.par_iter()
                .zip(buckets.par_iter())
                .enumerate()
                .map(|(k, (&(a, b), &bk))| features::cross(a, b, bk).map_err(|e| format!("pairs[{k}]: {e}")))
                .collect::<Result<_, String>>()
        })
        .map_err(value_err)?;
    Ok(outs.into_iter().map(|(v, o)| (v.into_pyarray(py), o.into_pyarray(py))).collect())
}

/// For each ragged feature: (index of the kept elements, new offsets).
#[pyfunction]
fn truncate_many<'py>(
    py: Python<'py>,
    offsets: Vec<PyReadonlyArray1<'py, i64>>,
    max_lens: Vec<usize>,
    keep_first: Vec<bool>,
) -> PyResult<Vec<RaggedOut<'py>>> {
    same_len(offsets.len(), max_lens.len(), "truncate_many")?;
    same_len(offsets.len(), keep_first.len(), "truncate_many")?;
    let os = slices(&offsets, "offsets")?;
    for (k, o) in os.iter().enumerate() {
        check_ragged(o, *o.last().unwrap_or(&0) as usize, &format!("offsets[{k}]"))?;
    }
    let outs: Vec<(Vec<i64>, Vec<i64>)> = py.detach(|| {
        os.par_iter()
            .zip(max_lens.par_iter().zip(keep_first.par_iter()))
            .map(|(o, (&m, &first))| {
                let (starts, new_offsets) = features::truncate_ranges(o, m, first);
                let mut index = Vec::with_capacity(*new_offsets.last().unwrap() as usize);
                for (i, &s) in starts.iter().enumerate() {
                    index.extend(s..s + (new_offsets[i + 1] - new_offsets[i]));
                }
                (index, new_offsets)
            })
            .collect()
    });
    Ok(outs.into_iter().map(|(i, o)| (i.into_pyarray(py), o.into_pyarray(py))).collect())
}

// ----------------------------------------------------------------------------
// ORC reading.

use recis_core::io::{self as rio, ColumnRequest, Cursor, Element, Values};
use std::path::PathBuf;

fn io_err(e: rio::IoError) -> PyErr {
    PyValueError::new_err(e.0)
}

/// The ORC files of a dataset, their stripes and the requested columns.
#[pyclass(name = "OrcSource", module = "recis._native", frozen)]
struct PyOrcSource {
    source: Arc<rio::Source>,
}

#[pymethods]
impl PyOrcSource {
    /// `columns`: (name, hash, bucket) per requested column.
    #[new]
    fn new(py: Python<'_>, paths: Vec<PathBuf>, columns: Vec<(String, bool, u64)>) -> PyResult<Self> {
        let columns: Vec<ColumnRequest> =
            columns.into_iter().map(|(name, hash, bucket)| ColumnRequest { name, hash, bucket }).collect();
        let source = py
            .detach(|| rio::expand_paths(&paths).and_then(|files| rio::Source::open(&files, &columns)))
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
struct PyOrcReader {
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
                    Some(r) => r.next_batch(),
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

/// The rows a trainable lookup handed out (`recis_core::pipeline::Ticket`):
/// opaque to Python, which passes it back to `apply_gradients_many`.
#[pyclass(name = "Ticket", module = "recis._native", frozen)]
struct PyTicket {
    ticket: Arc<Ticket>,
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

fn native_tables(tables: &[Bound<'_, PyHashTable>]) -> Vec<Arc<recis_core::HashTable>> {
    tables.iter().map(|t| t.get().table.clone()).collect()
}

/// `recis_core::pipeline::lookup_many`: the lookups (inserting where
/// `insert[i]`) of several (table, namespace) pairs in one call. Returns
/// (ids, rows, inverse, counts) for each.
#[pyfunction]
#[allow(clippy::type_complexity)]
#[pyo3(signature = (tables, ids, steps, insert, namespaces=None))]
fn lookup_unique_many<'py>(
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
fn lookup_gather_many<'py>(
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

/// Gradient-row indices as the core takes them (u32); one out of range is
/// an error naming its position.
fn indices_u32(index: &[i64]) -> Result<Vec<u32>, TableError> {
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
fn apply_gradients_many<'py>(
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

/// The bag layout of `pool_forward` / `pool_backward`, checked.
fn bags<'a>(
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
fn pool_forward(
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
fn pool_backward(
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

/// The distinct ids of each batch, the batches in parallel:
/// `recis_core::dedup::distinct`. One (ids, inverse, counts) a batch, in
/// order of first appearance.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn distinct_many<'py>(
    py: Python<'py>,
    batches: Vec<PyReadonlyArray1<'py, i64>>,
) -> PyResult<Vec<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>)>> {
    let batches: Vec<&[u64]> = batches.iter().map(|b| contiguous(b, "ids").map(as_u64)).collect::<PyResult<_>>()?;
    let found: Vec<recis_core::dedup::Distinct> =
        py.detach(|| batches.par_iter().map(|b| recis_core::dedup::distinct(b)).collect());
    let wide = |v: Vec<u32>| v.into_iter().map(i64::from).collect::<Vec<i64>>();
    Ok(found
        .into_iter()
        .map(|d| (into_i64(d.ids).into_pyarray(py), wide(d.inverse).into_pyarray(py), wide(d.counts).into_pyarray(py)))
        .collect())
}

/// Number of threads of the rayon pool used by every batch call.
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHashTable>()?;
    m.add_class::<PyOptimizer>()?;
    m.add_class::<PyTicket>()?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(lookup_unique_many, m)?)?;
    m.add_function(wrap_pyfunction!(lookup_gather_many, m)?)?;
    m.add_function(wrap_pyfunction!(apply_gradients_many, m)?)?;
    m.add_function(wrap_pyfunction!(distinct_many, m)?)?;
    m.add_function(wrap_pyfunction!(pool_forward, m)?)?;
    m.add_function(wrap_pyfunction!(pool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint64, m)?)?;
    m.add_class::<PyOrcSource>()?;
    m.add_class::<PyOrcReader>()?;
    m.add_function(wrap_pyfunction!(hash_strings_many, m)?)?;
    m.add_function(wrap_pyfunction!(hash_ids_many, m)?)?;
    m.add_function(wrap_pyfunction!(mod_many, m)?)?;
    m.add_function(wrap_pyfunction!(multi_hash_many, m)?)?;
    m.add_function(wrap_pyfunction!(bucketize_many, m)?)?;
    m.add_function(wrap_pyfunction!(cross_many, m)?)?;
    m.add_function(wrap_pyfunction!(truncate_many, m)?)?;
    m.add("NO_ROW", NO_ROW)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
