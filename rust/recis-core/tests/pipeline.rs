//! The group pipeline (`recis_core::pipeline`): lookups of many namespaces
//! under one lock per table, the gather into one block, and updates from
//! tickets; checked against a `HashMap` model, and for the deadlock of a
//! growing coalesced table under several rayon threads.

use proptest::prelude::*;
use recis_core::pipeline::{apply_many, lookup_gather, lookup_many, Request, Rows, Update};
use recis_core::{HashTable, Initializer, Missing, SparseOptimizer, TableConfig, NO_ROW};
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

fn coalesced(dim: usize, namespaces: usize, capacity: usize) -> HashTable {
    let mut cfg = TableConfig::new(dim);
    cfg.initializer = Initializer::Uniform { low: -0.1, high: 0.1 };
    cfg.initial_capacity = capacity;
    cfg.first_segment_rows = 8;
    cfg.num_shards = 16;
    cfg.namespace_seeds = (0..namespaces as u64).map(|n| 100 + n).collect();
    HashTable::new(cfg).unwrap()
}

/// 26 coalesced namespaces, a tiny initial capacity, mostly new ids every
/// step: every step grows shards while other namespaces' lookups run.
/// Before the pipeline held one guard per table per call, a rayon worker
/// waiting inside one namespace's lookup stole another's, which blocked on
/// the read lock behind a waiting grow: a deadlock at 3 or more threads.
fn train_growing(threads: usize, steps: u64) -> usize {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let t = coalesced(4, 26, 64);
        let sgd = SparseOptimizer::Sgd { weight_decay: 0.0 };
        t.set_slots(sgd.slot_width(4), 0.0).unwrap();
        let per = 97;
        for step in 0..steps {
            let ids: Vec<Vec<u64>> = (0..26u64)
                .map(|ns| (0..per).map(|k| step * 1_000_003 + ns * 7919 + k * (1 + k % 3)).collect())
                .collect();
            let reqs: Vec<Request> =
                ids.iter().enumerate().map(|(ns, i)| Request::new(&t, ns, i).insert(step)).collect();
            let block = lookup_gather(&reqs).unwrap();
            assert_eq!(block.runs.len(), 1, "one run: one table, all trainable");
            let ticket = &block.runs[0].2;
            let u = ticket.len();
            let grads = vec![0.01f32; u * 4];
            let index: Vec<u32> = (0..u as u32).collect();
            let tickets = [ticket];
            let upd = Update { table: &t, rows: Rows::Tickets(&tickets), index: &index, grads: &grads, step: step + 1 };
            for r in apply_many(&[upd], &sgd, 0.1) {
                r.unwrap();
            }
            // A table-wide call between steps, as the optimizer's step is.
            if step % 50 == 49 {
                t.evict(&recis_core::EvictionPolicy { ttl_steps: Some(20), ..Default::default() }, step);
            }
        }
        t.len()
    })
}

#[test]
fn growing_coalesced_table_does_not_hang_at_2_3_4_and_8_threads() {
    // RECIS_STRESS_STEPS runs it longer by hand (e.g. 3000).
    let steps = std::env::var("RECIS_STRESS_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    for threads in [2, 3, 4, 8] {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(train_growing(threads, steps)).unwrap());
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(len) => assert!(len > 0),
            Err(_) => panic!("{steps} steps at {threads} rayon threads did not finish in 120 s: deadlock"),
        }
    }
}

fn ids_strategy() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(prop_oneof![0u64..40, Just(u64::MAX), any::<u64>()], 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `lookup_gather` over namespaces of two tables equals a model keyed by
    /// (table, namespace, id): which ids get rows, that rows persist across
    /// calls, that the block holds each position's row, and that a read-only
    /// request inserts nothing.
    #[test]
    fn lookup_gather_agrees_with_a_dict_model(
        batches in prop::collection::vec((ids_strategy(), ids_strategy(), ids_strategy(), any::<bool>()), 1..6)
    ) {
        let a = coalesced(3, 2, 8);
        let b = coalesced(3, 1, 8);
        // Model: (table, ns, id) -> first value seen.
        let mut model: HashMap<(usize, usize, u64), Vec<f32>> = HashMap::new();
        for (step, (x, y, z, read_z)) in batches.iter().enumerate() {
            let step = step as u64;
            let mut rz = Request::new(&b, 0, z).missing(Missing::Zeros);
            if !read_z {
                rz = rz.insert(step);
            }
            let reqs = [Request::new(&a, 0, x).insert(step), Request::new(&a, 1, y).insert(step), rz];
            let keys = [(0usize, 0usize), (0, 1), (1, 0)];
            let block = lookup_gather(&reqs).unwrap();
            let mut at = 0usize;
            for (k, ids) in [x, y, z].into_iter().enumerate() {
                for &id in ids.iter() {
                    let r = block.inverse[at] as usize;
                    let got = &block.values[r * 3..r * 3 + 3];
                    let key = (keys[k].0, keys[k].1, id);
                    let inserted = reqs[k].insert.is_some();
                    match model.get(&key) {
                        Some(v) => prop_assert_eq!(got, &v[..], "stored value of {:?}", key),
                        None if inserted => { model.insert(key, got.to_vec()); }
                        None => prop_assert!(got.iter().all(|&g| g == 0.0), "absent {:?} reads zeros", key),
                    }
                    at += 1;
                }
            }
            prop_assert_eq!(at, block.inverse.len());
            let in_a = model.keys().filter(|k| k.0 == 0).count();
            let in_b = model.keys().filter(|k| k.0 == 1).count();
            prop_assert_eq!(a.len(), in_a);
            prop_assert_eq!(b.len(), in_b);
            // Runs: the two inserting requests of `a`, and `z` when inserting.
            prop_assert_eq!(block.runs.len(), if *read_z { 1 } else { 2 });
            prop_assert_eq!((block.runs[0].0, block.runs[0].1), (0, 2));
            // lookup_many gives the same rows.
            let again = lookup_many(&[Request::new(&a, 0, x), Request::new(&a, 1, y)]).unwrap();
            for (u, f) in again.iter().zip(&block.found) {
                let mut want: Vec<(u64, u32)> = f.ids.iter().copied().zip(f.rows.iter().copied()).collect();
                let mut got: Vec<(u64, u32)> = u.ids.iter().copied().zip(u.rows.iter().copied()).collect();
                want.sort_unstable();
                got.sort_unstable();
                prop_assert_eq!(got, want);
            }
        }
    }
}

#[test]
fn a_ticket_is_refused_after_eviction_and_by_another_table() {
    let t = coalesced(2, 1, 8);
    let other = coalesced(2, 1, 8);
    let sgd = SparseOptimizer::Sgd { weight_decay: 0.0 };
    t.set_slots(0, 0.0).unwrap();
    other.set_slots(0, 0.0).unwrap();
    let ids = [1u64, 2, 3];
    let block = lookup_gather(&[Request::new(&t, 0, &ids).insert(1)]).unwrap();
    let ticket = &block.runs[0].2;
    let tickets = [ticket];
    let index = [0u32, 1, 2];
    let grads = [1.0f32; 6];
    let wrong = Update { table: &other, rows: Rows::Tickets(&tickets), index: &index, grads: &grads, step: 1 };
    let err = apply_many(&[wrong], &sgd, 0.1).pop().unwrap().unwrap_err();
    assert!(err.to_string().contains("another table"), "{err}");
    let before: Vec<f32> = {
        let mut out = vec![0.0; 6];
        t.gather(&ids, &t.lookup(&ids).unwrap(), Missing::Zeros, &mut out).unwrap();
        out
    };
    t.evict(&recis_core::EvictionPolicy { min_frequency: Some(1_000), ..Default::default() }, 5);
    let stale = Update { table: &t, rows: Rows::Tickets(&tickets), index: &index, grads: &grads, step: 1 };
    let err = apply_many(&[stale], &sgd, 0.1).pop().unwrap().unwrap_err();
    assert!(err.to_string().contains("evicted"), "{err}");
    assert!(before.iter().any(|&v| v != 0.0));
    // The rows are free now: reading them by number is refused.
    let mut out = vec![0.0; 6];
    let err = t.gather(&ids, ticket.rows(), Missing::Zeros, &mut out).unwrap_err();
    assert!(err.to_string().contains("not a live row"), "{err}");
}

#[test]
fn repeated_rows_from_outside_are_summed_not_aliased() {
    // Rows that repeat (not a ticket's) take the grouping by row: the
    // update equals one update by the summed gradient.
    let t = coalesced(2, 1, 8);
    let twin = coalesced(2, 1, 8);
    let sgd = SparseOptimizer::Sgd { weight_decay: 0.0 };
    for x in [&t, &twin] {
        x.set_slots(0, 0.0).unwrap();
    }
    let rows = t.lookup_or_insert(&[7, 8], 0).unwrap();
    let rows2 = twin.lookup_or_insert(&[7, 8], 0).unwrap();
    let repeated = [rows[0], rows[0], rows[1]];
    let index = [0u32, 1, 2];
    let grads = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let u = Update { table: &t, rows: Rows::Any(&repeated), index: &index, grads: &grads, step: 1 };
    apply_many(&[u], &sgd, 0.5).pop().unwrap().unwrap();
    twin.apply_gradients(&rows2, &[4.0, 6.0, 5.0, 6.0], &sgd, 0.5, 1).unwrap();
    let (mut a, mut b) = (vec![0.0; 4], vec![0.0; 4]);
    t.gather(&[7, 8], &rows, Missing::Zeros, &mut a).unwrap();
    twin.gather(&[7, 8], &rows2, Missing::Zeros, &mut b).unwrap();
    assert_eq!(a, b);
    assert!(rows.iter().all(|&r| r != NO_ROW));
}

#[test]
fn one_namespace_twice_in_a_call_grows_once_and_splits_the_run() {
    // Two inserting requests of one (table, namespace) with the same new
    // ids, into a table too small for either: the grow makes room for both
    // (it used to retry forever), the duplicate claims resolve without a
    // stall, and the run ends where the namespace comes again, so no ticket
    // holds a row twice.
    let t = coalesced(2, 2, 8);
    let ids: Vec<u64> = (0..500).collect();
    let reqs =
        [Request::new(&t, 0, &ids).insert(1), Request::new(&t, 0, &ids).insert(1), Request::new(&t, 1, &ids).insert(1)];
    let (tx, rx) = mpsc::channel();
    let t2 = coalesced(2, 2, 8);
    std::thread::spawn(move || {
        let ids: Vec<u64> = (0..500).collect();
        let reqs = [
            Request::new(&t2, 0, &ids).insert(1),
            Request::new(&t2, 0, &ids).insert(1),
            Request::new(&t2, 1, &ids).insert(1),
        ];
        tx.send(lookup_gather(&reqs).map(|b| b.runs.len())).unwrap();
    });
    let runs = rx.recv_timeout(Duration::from_secs(60)).expect("no endless grow loop or stall").unwrap();
    assert_eq!(runs, 2);
    let block = lookup_gather(&reqs).unwrap();
    assert_eq!(t.len(), 1000);
    assert_eq!(block.found[0].rows, block.found[1].rows, "the same ids, the same rows");
    let spans: Vec<(usize, usize)> = block.runs.iter().map(|(a, b, _)| (*a, *b)).collect();
    assert_eq!(spans, vec![(0, 1), (1, 3)]);
    for (_, _, ticket) in &block.runs {
        let mut rows = ticket.rows().to_vec();
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), ticket.len(), "a ticket's rows are distinct");
    }
    // Both tickets in one update: rows repeat, so the gradients of a row are
    // summed (the grouping by row), which equals one update by the sum.
    let sgd = SparseOptimizer::Sgd { weight_decay: 0.0 };
    t.set_slots(0, 0.0).unwrap();
    let before = block.values.clone();
    let tickets: Vec<_> = block.runs.iter().map(|(_, _, tk)| tk).collect();
    let n = tickets.iter().map(|tk| tk.len()).sum::<usize>();
    let index: Vec<u32> = (0..n as u32).collect();
    let grads = vec![1.0f32; n * 2];
    let u = Update { table: &t, rows: Rows::Tickets(&tickets), index: &index, grads: &grads, step: 1 };
    apply_many(&[u], &sgd, 0.5).pop().unwrap().unwrap();
    let mut after = vec![0.0f32; 500 * 2];
    t.gather(&ids, &t.lookup(&ids).unwrap(), Missing::Zeros, &mut after).unwrap();
    let r0 = &block.found[0];
    for (k, &id) in ids.iter().enumerate() {
        let j = r0.ids.iter().position(|&x| x == id).unwrap();
        for c in 0..2 {
            // Namespace 0's rows got two gradients of 1 each: -0.5 * 2.
            let (a, b) = (after[k * 2 + c], before[j * 2 + c]);
            assert!((a - (b - 1.0)).abs() < 1e-6, "id {id}: {b} -> {a}");
        }
    }
}

/// (bag lengths per feature and sample, ids per position, weights, mean).
fn pooled_case() -> impl Strategy<Value = (usize, usize, Vec<usize>, Vec<u64>, Vec<f32>, bool, bool)> {
    (1usize..4, 1usize..6, any::<bool>(), any::<bool>()).prop_flat_map(|(features, batch, weighted, mean)| {
        proptest::collection::vec(0usize..4, features * batch).prop_flat_map(move |lens| {
            let n: usize = lens.iter().sum();
            (Just(lens), proptest::collection::vec(0u64..12, n), proptest::collection::vec(-2.0f32..2.0, n))
                .prop_map(move |(lens, ids, w)| (features, batch, lens, ids, w, weighted, mean))
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The update fused with the pooling's backward equals the pooling's
    /// backward into a [rows, dim] gradient followed by the deferred
    /// update, bit for bit, for every optimizer (two namespaces of one
    /// table: one namespace per feature, the last feature's positions in
    /// the second).
    #[test]
    fn fused_update_equals_backward_then_update((features, batch, lens, ids, wts, weighted, mean) in pooled_case()) {
        use recis_core::pipeline::{apply_pooled, PooledPart};
        use recis_core::pool::Bags;
        let dim = 3;
        let mut offsets = vec![0i64];
        for &l in &lens {
            offsets.push(offsets[offsets.len() - 1] + l as i64);
        }
        // Positions of features 0..features-1 in namespace 0, the last in 1.
        let split = offsets[(features - 1) * batch] as usize;
        let weights = if weighted { Some(&wts[..]) } else { None };
        let opts = [
            SparseOptimizer::Sgd { weight_decay: 0.01 },
            SparseOptimizer::Adagrad { lr_decay: 0.01, eps: 1e-10, initial_accumulator: 0.1, weight_decay: 0.0 },
            SparseOptimizer::RowWiseAdagrad { eps: 1e-8, initial_accumulator: 0.0, weight_decay: 0.0 },
            SparseOptimizer::Adam { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 },
            SparseOptimizer::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 },
        ];
        for opt in &opts {
            let tables = [coalesced(dim, 2, 16), coalesced(dim, 2, 16)];
            for t in &tables {
                t.set_slots(opt.slot_width(dim), opt.slot_init()).unwrap();
            }
            let mut got = Vec::new();
            for (k, t) in tables.iter().enumerate() {
                // Namespace 0's ids as one request, or two (a namespace
                // that repeats starts a second ticket of the table).
                let half = split / 2;
                let reqs: Vec<Request> = if split % 2 == 1 {
                    vec![
                        Request::new(t, 0, &ids[..half]).insert(1),
                        Request::new(t, 0, &ids[half..split]).insert(1),
                        Request::new(t, 1, &ids[split..]).insert(1),
                    ]
                } else {
                    vec![Request::new(t, 0, &ids[..split]).insert(1), Request::new(t, 1, &ids[split..]).insert(1)]
                };
                let block = lookup_gather(&reqs).unwrap();
                let tickets: Vec<&recis_core::pipeline::Ticket> = block.runs.iter().map(|r| &r.2).collect();
                let rows = block.values.len() / dim;
                let bags = Bags::new(&block.inverse, &offsets, weights, mean, features, rows).unwrap();
                let grad: Vec<f32> = (0..bags.outputs() * dim).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
                if k == 0 {
                    let mut gw = vec![0.0f32; rows * dim];
                    bags.backward(&grad, dim, &mut gw).unwrap();
                    let index: Vec<u32> = (0..rows as u32).collect();
                    let u = Update { table: t, rows: Rows::Tickets(&tickets), index: &index, grads: &gw, step: 3 };
                    for r in apply_many(&[u], opt, 0.05) {
                        r.unwrap();
                    }
                } else {
                    let parts: Vec<PooledPart> =
                        tickets.iter().map(|ticket| PooledPart { table: t, ticket, opt, lr: 0.05, step: 3 }).collect();
                    for r in apply_pooled(&bags, &grad, dim, &parts) {
                        r.unwrap();
                    }
                }
                // Every row of both namespaces, by (namespace, id).
                let (keys, _rows, nss) = t.export_entries();
                let mut all: Vec<(u32, u64, Vec<f32>)> = Vec::new();
                for (&id, &ns) in keys.iter().zip(&nss) {
                    let mut v = vec![0.0f32; dim];
                    let r = t.lookup_in(ns as usize, &[id]).unwrap();
                    t.gather_in(ns as usize, &[id], &r, Missing::Zeros, &mut v).unwrap();
                    all.push((ns, id, v));
                }
                all.sort_by_key(|a| (a.0, a.1));
                let distinct = |xs: &[u64]| xs.iter().collect::<std::collections::HashSet<_>>().len();
                prop_assert_eq!(all.len(), distinct(&ids[..split]) + distinct(&ids[split..]));
                got.push(all);
            }
            prop_assert_eq!(&got[0], &got[1], "{}", opt.name());
        }
    }
}

#[test]
fn fused_update_refuses_bad_parts_and_non_finite_gradients_and_changes_nothing() {
    use recis_core::pipeline::{apply_pooled, PooledPart};
    use recis_core::pool::Bags;
    let t = coalesced(2, 1, 16);
    let sgd = SparseOptimizer::Sgd { weight_decay: 0.0 };
    t.set_slots(sgd.slot_width(2), 0.0).unwrap();
    let ids = [5u64, 6, 5];
    let block = lookup_gather(&[Request::new(&t, 0, &ids).insert(1)]).unwrap();
    let (_, _, ticket) = &block.runs[0];
    let offsets = [0i64, 2, 3];
    let bags = Bags::new(&block.inverse, &offsets, None, false, 1, 2).unwrap();
    let before = block.values.clone();
    let read = |t: &HashTable| {
        let mut v = vec![0.0f32; 4];
        t.gather(&[5, 6], &t.lookup(&[5, 6]).unwrap(), Missing::Zeros, &mut v).unwrap();
        v
    };
    let part = || PooledPart { table: &t, ticket, opt: &sgd, lr: 0.1, step: 1 };
    // A finite pooled gradient whose row sums overflow is refused too.
    let cases: [(Vec<f32>, PooledPart, &str); 3] = [
        (vec![1.0, f32::NAN, 0.0, 0.0], part(), "non-finite gradient NaN"),
        (vec![f32::MAX; 4], part(), "non-finite gradient inf"),
        (vec![1.0; 3], part(), "grad: expected 4 values"),
    ];
    for (grad, p, want) in cases {
        let e = apply_pooled(&bags, &grad, 2, &[p]).remove(0).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert_eq!(read(&t), before);
    }
    // A ticket of another lookup, or rows outside the block the bags pool.
    let other = lookup_gather(&[Request::new(&t, 0, &[7, 8]).insert(1)]).unwrap();
    let stranger = PooledPart { ticket: &other.runs[0].2, ..part() };
    let e = apply_pooled(&bags, &[1.0; 4], 2, &[part(), stranger]).remove(0).unwrap_err().to_string();
    assert!(e.contains("another lookup"), "{e}");
    let narrow = Bags::new(&[0, 0, 0], &offsets, None, false, 1, 1).unwrap();
    let e = apply_pooled(&narrow, &[1.0; 4], 2, &[part()]).remove(0).unwrap_err().to_string();
    assert!(e.contains("not inside the block's 1 rows"), "{e}");
    assert_eq!(read(&t), before);
}
