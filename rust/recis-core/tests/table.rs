//! Behaviour of the hash table against a plain `HashMap` model.

use proptest::prelude::*;
use recis_core::{
    AdmissionPolicy, EvictionPolicy, EvictionScore, HashTable, Initializer, Missing, SparseOptimizer, TableConfig,
    NO_ROW,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

fn small_table(dim: usize) -> HashTable {
    let mut cfg = TableConfig::new(dim);
    cfg.num_shards = 8;
    cfg.initial_capacity = 16;
    cfg.first_segment_rows = 4;
    cfg.initializer = Initializer::Normal { mean: 0.0, std: 1.0 };
    cfg.seed = 11;
    HashTable::new(cfg).unwrap()
}

fn gather(t: &HashTable, ids: &[u64], missing: Missing) -> Vec<f32> {
    let rows = t.lookup(ids).unwrap();
    let mut out = vec![0.0; ids.len() * t.dim()];
    t.gather(ids, &rows, missing, &mut out).unwrap();
    out
}

#[test]
fn every_u64_is_a_key_including_the_empty_sentinel() {
    let t = small_table(2);
    let ids = [0u64, 1, u64::MAX, u64::MAX - 1, 1 << 63, (i64::MIN + 1) as u64];
    let rows = t.lookup_or_insert(&ids, 1).unwrap();
    assert_eq!(t.len(), ids.len());
    let distinct: HashSet<u32> = rows.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len());
    assert_eq!(t.lookup(&ids).unwrap(), rows);
}

#[test]
fn unique_lookup_inverse_reconstructs_the_batch() {
    let t = small_table(4);
    let ids: Vec<u64> = (0..1000).map(|i| (i * 7919) % 97).collect();
    let u = t.lookup_or_insert_unique(&ids, 3).unwrap();
    assert_eq!(u.ids.len(), 97);
    for (p, &id) in ids.iter().enumerate() {
        assert_eq!(u.ids[u.inverse[p] as usize], id);
    }
    let total: u32 = u.counts.iter().sum();
    assert_eq!(total as usize, ids.len());
}

#[test]
fn initial_value_depends_on_seed_and_id_only() {
    let a = small_table(8);
    let b = small_table(8);
    let ids: Vec<u64> = (0..500).collect();
    let mut rev = ids.clone();
    rev.reverse();
    a.lookup_or_insert(&ids, 0).unwrap();
    for chunk in rev.chunks(7) {
        b.lookup_or_insert(chunk, 0).unwrap();
    }
    assert_eq!(gather(&a, &ids, Missing::Zeros), gather(&b, &ids, Missing::Zeros));
    let mut init = vec![0.0; ids.len() * 8];
    a.initial_values(&ids, &mut init).unwrap();
    assert_eq!(gather(&a, &ids, Missing::Zeros), init);
}

#[test]
fn read_only_lookup_inserts_nothing() {
    let t = small_table(2);
    let u = t.lookup_unique(&[5, 6, 5]).unwrap();
    assert!(u.rows.iter().all(|&r| r == NO_ROW));
    assert_eq!(t.len(), 0);
    assert_eq!(gather(&t, &[5], Missing::Zeros), vec![0.0, 0.0]);
}

#[test]
fn not_admitted_ids_have_no_row_and_read_as_initial_value() {
    let mut cfg = TableConfig::new(3);
    cfg.admission = AdmissionPolicy::min_count(3);
    let t = HashTable::new(cfg).unwrap();
    assert_eq!(t.lookup_or_insert(&[42], 1).unwrap(), vec![NO_ROW]);
    assert_eq!(t.len(), 0);
    let mut init = vec![0.0; 3];
    t.initial_values(&[42], &mut init).unwrap();
    let mut out = vec![9.0; 3];
    t.gather(&[42], &[NO_ROW], Missing::Initial, &mut out).unwrap();
    assert_eq!(out, init);
    // Second and third sightings (two in one batch) admit it.
    let rows = t.lookup_or_insert(&[42, 42], 2).unwrap();
    assert_ne!(rows[0], NO_ROW);
    assert_eq!(rows[0], rows[1]);
    assert_eq!(t.len(), 1);
}

#[test]
fn evicted_row_is_reused() {
    let t = small_table(2);
    let rows = t.lookup_or_insert(&[1, 2, 3], 1).unwrap();
    t.lookup_or_insert(&[2, 3], 10).unwrap();
    let gone = t.evict(&EvictionPolicy { ttl_steps: Some(5), ..Default::default() }, 10);
    assert_eq!(gone, vec![1]);
    assert_eq!(t.len(), 2);
    let stats_before = t.stats();
    let new = t.lookup_or_insert(&[99], 11).unwrap();
    assert_eq!(new[0], rows[0], "the freed row is taken first");
    assert_eq!(t.stats().rows_allocated, stats_before.rows_allocated);
}

#[test]
fn eviction_by_frequency_norm_and_cap() {
    let t = small_table(2);
    for step in 1..=5u64 {
        t.lookup_or_insert(&(0..step).collect::<Vec<_>>(), step).unwrap();
    }
    // id k was seen 5 - k times, last at step 5 (k < 5).
    let gone: HashSet<u64> =
        t.evict(&EvictionPolicy { min_frequency: Some(3), ..Default::default() }, 5).into_iter().collect();
    assert_eq!(gone, HashSet::from([3, 4]));
    let gone = t.evict(&EvictionPolicy { max_rows: Some(1), score: EvictionScore::Lfu, ..Default::default() }, 5);
    assert_eq!(gone.len(), 2);
    assert!(t.lookup(&[0]).unwrap() != vec![NO_ROW], "the most frequent id stays");
    // A row zeroed by import has norm 0.
    let (ids, _) = t.export_keys();
    t.import(&ids, &[0.0, 0.0], &[1], &[1]).unwrap();
    let gone = t.evict(&EvictionPolicy { min_l2_norm: Some(1e-6), ..Default::default() }, 5);
    assert_eq!(gone, vec![0]);
    assert!(t.is_empty());
}

#[test]
fn export_import_round_trip_with_slots_and_meta() {
    let t = small_table(3);
    t.set_slots(3, 0.5).unwrap();
    let ids: Vec<u64> = (0..300).map(|i| i * 1_000_003).chain([u64::MAX]).collect();
    t.lookup_or_insert(&ids, 4).unwrap();
    let (kids, krows) = t.export_keys();
    let mut vals = vec![0.0; kids.len() * 6];
    let (mut f, mut l) = (vec![0; kids.len()], vec![0; kids.len()]);
    t.read_rows(&krows, &mut vals, &mut f, &mut l).unwrap();
    assert!(l.iter().all(|&s| s == 4));
    let u = small_table(3);
    u.set_slots(3, 0.0).unwrap();
    u.import(&kids, &vals, &f, &l).unwrap();
    assert_eq!(u.len(), t.len());
    assert_eq!(gather(&u, &ids, Missing::Zeros), gather(&t, &ids, Missing::Zeros));
    let bad = u.import(&kids[..1], &vals[..5], &f[..1], &l[..1]).unwrap_err();
    assert!(bad.to_string().contains("width 6"), "{bad}");
}

#[test]
fn bad_rows_and_gradients_are_refused_and_leave_the_table_unchanged() {
    let t = small_table(2);
    let opt = SparseOptimizer::Sgd { weight_decay: 0.0 };
    let rows = t.lookup_or_insert(&[7], 1).unwrap();
    let before = gather(&t, &[7], Missing::Zeros);
    let e = t.apply_gradients(&rows, &[1.0, f32::NAN], &opt, 0.1, 1).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    let e = t.apply_gradients(&[1234], &[1.0, 1.0], &opt, 0.1, 1).unwrap_err();
    assert!(e.to_string().contains("rows[0] = 1234"), "{e}");
    assert_eq!(gather(&t, &[7], Missing::Zeros), before);
}

#[test]
fn gradients_of_one_row_are_summed_before_the_update() {
    let opt = SparseOptimizer::Adagrad { lr_decay: 0.0, eps: 1e-10, initial_accumulator: 0.0, weight_decay: 0.0 };
    let a = small_table(2);
    let b = small_table(2);
    for t in [&a, &b] {
        t.set_slots(2, 0.0).unwrap();
    }
    let ra = a.lookup_or_insert(&[1], 1).unwrap()[0];
    let rb = b.lookup_or_insert(&[1], 1).unwrap()[0];
    a.apply_gradients(&[ra, ra, NO_ROW], &[1.0, 2.0, 3.0, 4.0, 9.0, 9.0], &opt, 0.1, 1).unwrap();
    b.apply_gradients(&[rb], &[4.0, 6.0], &opt, 0.1, 1).unwrap();
    assert_eq!(gather(&a, &[1], Missing::Zeros), gather(&b, &[1], Missing::Zeros));
}

#[test]
fn grows_from_tiny_to_many_ids_without_losing_any() {
    let t = small_table(1);
    let ids: Vec<u64> = (0..200_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let mut rows = Vec::new();
    for chunk in ids.chunks(4096) {
        rows.extend(t.lookup_or_insert(chunk, 1).unwrap());
    }
    assert_eq!(t.len(), ids.len());
    assert_eq!(t.lookup(&ids).unwrap(), rows);
    let distinct: HashSet<u32> = rows.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len());
}

#[test]
fn eight_threads_inserting_overlapping_ids_get_one_row_per_id() {
    let t = Arc::new(small_table(2));
    let handles: Vec<_> = (0..8u64)
        .map(|k| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                // Thread k inserts ids [k*5000, k*5000 + 20000): each id is
                // shared by up to four threads.
                let ids: Vec<u64> = (k * 5000..k * 5000 + 20_000).collect();
                for chunk in ids.chunks(997) {
                    let rows = t.lookup_or_insert(chunk, k).unwrap();
                    seen.extend(chunk.iter().copied().zip(rows));
                }
                seen
            })
        })
        .collect();
    let mut row_of: HashMap<u64, u32> = HashMap::new();
    for h in handles {
        for (id, row) in h.join().unwrap() {
            let prev = *row_of.entry(id).or_insert(row);
            assert_eq!(prev, row, "id {id} got two rows");
        }
    }
    assert_eq!(t.len(), row_of.len());
    let rows: HashSet<u32> = row_of.values().copied().collect();
    assert_eq!(rows.len(), row_of.len(), "two ids share a row");
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Vec<u64>),
    Lookup(Vec<u64>),
    EvictTtl(u64),
    ExportImport,
}

fn id_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, Just(u64::MAX), Just(0u64), any::<u64>()]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(id_strategy(), 0..40).prop_map(Op::Insert),
        2 => prop::collection::vec(id_strategy(), 0..40).prop_map(Op::Lookup),
        1 => (0u64..4).prop_map(Op::EvictTtl),
        1 => Just(Op::ExportImport),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_op_sequences_agree_with_a_dict_model(ops in prop::collection::vec(op_strategy(), 1..30)) {
        let mut t = small_table(2);
        // Model: id -> last step seen.
        let mut model: HashMap<u64, u64> = HashMap::new();
        for (step, op) in ops.into_iter().enumerate() {
            let step = step as u64 + 1;
            match op {
                Op::Insert(ids) => {
                    let rows = t.lookup_or_insert(&ids, step).unwrap();
                    for (&id, &r) in ids.iter().zip(&rows) {
                        prop_assert_ne!(r, NO_ROW);
                        model.insert(id, step);
                    }
                }
                Op::Lookup(ids) => {
                    let rows = t.lookup(&ids).unwrap();
                    for (&id, &r) in ids.iter().zip(&rows) {
                        prop_assert_eq!(r != NO_ROW, model.contains_key(&id), "id {}", id);
                    }
                }
                Op::EvictTtl(ttl) => {
                    let mut gone = t.evict(&EvictionPolicy { ttl_steps: Some(ttl), ..Default::default() }, step);
                    let mut expect: Vec<u64> = model.iter().filter(|&(_, &s)| step - s > ttl).map(|(&k, _)| k).collect();
                    gone.sort_unstable();
                    expect.sort_unstable();
                    prop_assert_eq!(&gone, &expect);
                    model.retain(|_, &mut s| step - s <= ttl);
                }
                Op::ExportImport => {
                    let (ids, rows) = t.export_keys();
                    let mut vals = vec![0.0; ids.len() * 2];
                    let (mut f, mut l) = (vec![0; ids.len()], vec![0; ids.len()]);
                    t.read_rows(&rows, &mut vals, &mut f, &mut l).unwrap();
                    let fresh = small_table(2);
                    fresh.import(&ids, &vals, &f, &l).unwrap();
                    t = fresh;
                }
            }
            prop_assert_eq!(t.len(), model.len());
        }
        let (mut ids, _) = t.export_keys();
        ids.sort_unstable();
        let mut expect: Vec<u64> = model.keys().copied().collect();
        expect.sort_unstable();
        prop_assert_eq!(ids, expect);
    }
}

fn namespaced_table(dim: usize, seeds: &[u64]) -> HashTable {
    let mut cfg = TableConfig::new(dim);
    cfg.num_shards = 64;
    cfg.initial_capacity = 16;
    cfg.first_segment_rows = 4;
    cfg.initializer = Initializer::Normal { mean: 0.0, std: 1.0 };
    cfg.namespace_seeds = seeds.to_vec();
    HashTable::new(cfg).unwrap()
}

#[derive(Debug, Clone)]
enum NsOp {
    Insert(usize, Vec<u64>),
    Lookup(usize, Vec<u64>),
    EvictTtl(u64),
    Remove(usize, Vec<u64>),
    ExportImport,
}

fn ns_op_strategy() -> impl Strategy<Value = NsOp> {
    let ids = || prop::collection::vec(id_strategy(), 0..40);
    prop_oneof![
        4 => (0usize..3, ids()).prop_map(|(n, v)| NsOp::Insert(n, v)),
        2 => (0usize..3, ids()).prop_map(|(n, v)| NsOp::Lookup(n, v)),
        1 => (0u64..4).prop_map(NsOp::EvictTtl),
        1 => (0usize..3, ids()).prop_map(|(n, v)| NsOp::Remove(n, v)),
        1 => Just(NsOp::ExportImport),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Three namespaces in one table against a dict keyed by (namespace, id):
    /// the same id in two namespaces is two keys with two rows.
    #[test]
    fn namespaces_agree_with_a_dict_keyed_by_namespace_and_id(ops in prop::collection::vec(ns_op_strategy(), 1..30)) {
        let seeds = [5u64, 6, 7];
        let mut t = namespaced_table(2, &seeds);
        let mut model: HashMap<(u32, u64), (u64, u32)> = HashMap::new(); // -> (last step, row)
        for (step, op) in ops.into_iter().enumerate() {
            let step = step as u64 + 1;
            match op {
                NsOp::Insert(ns, ids) => {
                    let u = t.lookup_or_insert_unique_in(ns, &ids, step).unwrap();
                    for (&id, &r) in u.ids.iter().zip(&u.rows) {
                        prop_assert_ne!(r, NO_ROW);
                        if let Some(&(_, old)) = model.get(&(ns as u32, id)) {
                            prop_assert_eq!(old, r);
                        }
                        model.insert((ns as u32, id), (step, r));
                    }
                }
                NsOp::Lookup(ns, ids) => {
                    let rows = t.lookup_in(ns, &ids).unwrap();
                    for (&id, &r) in ids.iter().zip(&rows) {
                        let want = model.get(&(ns as u32, id)).map(|&(_, r)| r).unwrap_or(NO_ROW);
                        prop_assert_eq!(r, want, "namespace {} id {}", ns, id);
                    }
                }
                NsOp::EvictTtl(ttl) => {
                    let mut gone = t.evict_entries(&EvictionPolicy { ttl_steps: Some(ttl), ..Default::default() }, step);
                    let mut expect: Vec<(u32, u64)> =
                        model.iter().filter(|&(_, &(s, _))| step - s > ttl).map(|(&k, _)| k).collect();
                    gone.sort_unstable();
                    expect.sort_unstable();
                    prop_assert_eq!(&gone, &expect);
                    model.retain(|_, &mut (s, _)| step - s <= ttl);
                }
                NsOp::Remove(ns, ids) => {
                    // Repeated and absent ids among them: each held id goes once.
                    let held: std::collections::HashSet<u64> =
                        ids.iter().copied().filter(|&id| model.contains_key(&(ns as u32, id))).collect();
                    prop_assert_eq!(t.remove_in(ns, &ids).unwrap(), held.len());
                    for id in &held {
                        model.remove(&(ns as u32, *id));
                    }
                    // Freed rows are handed out again, each to one id.
                    let mut again: Vec<u64> = held.iter().map(|id| id ^ 0x5555).collect();
                    again.sort_unstable();
                    again.dedup();
                    again.retain(|&id| !model.contains_key(&(ns as u32, id)));
                    let u = t.lookup_or_insert_unique_in(ns, &again, step).unwrap();
                    for (&id, &r) in u.ids.iter().zip(&u.rows) {
                        prop_assert!(!model.values().any(|&(_, other)| other == r), "row {} handed out twice", r);
                        model.insert((ns as u32, id), (step, r));
                    }
                }
                NsOp::ExportImport => {
                    let (ids, rows, nss) = t.export_entries();
                    let mut vals = vec![0.0; ids.len() * 2];
                    let (mut f, mut l) = (vec![0; ids.len()], vec![0; ids.len()]);
                    t.read_rows(&rows, &mut vals, &mut f, &mut l).unwrap();
                    let fresh = namespaced_table(2, &seeds);
                    for ns in 0..3u32 {
                        let pick: Vec<usize> = (0..ids.len()).filter(|&k| nss[k] == ns).collect();
                        let i: Vec<u64> = pick.iter().map(|&k| ids[k]).collect();
                        let v: Vec<f32> = pick.iter().flat_map(|&k| vals[k * 2..k * 2 + 2].to_vec()).collect();
                        let ff: Vec<u32> = pick.iter().map(|&k| f[k]).collect();
                        let ll: Vec<u32> = pick.iter().map(|&k| l[k]).collect();
                        fresh.import_in(ns as usize, &i, &v, &ff, &ll).unwrap();
                    }
                    let remap: HashMap<(u32, u64), u32> = {
                        let (i2, r2, n2) = fresh.export_entries();
                        n2.into_iter().zip(i2).zip(r2).collect()
                    };
                    for (k, v) in model.iter_mut() {
                        v.1 = remap[k];
                    }
                    t = fresh;
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for ns in 0..3u32 {
                prop_assert_eq!(t.len_in(ns as usize).unwrap(), model.keys().filter(|k| k.0 == ns).count());
            }
        }
        let (ids, _, nss) = t.export_entries();
        let mut got: Vec<(u32, u64)> = nss.into_iter().zip(ids).collect();
        got.sort_unstable();
        let mut expect: Vec<(u32, u64)> = model.keys().copied().collect();
        expect.sort_unstable();
        prop_assert_eq!(got, expect);
    }
}

#[test]
fn each_namespace_has_its_own_initial_values_and_namespace_zero_matches_a_plain_table() {
    let ns = namespaced_table(4, &[11, 12]);
    let plain = small_table(4); // seed 11
    let ids: Vec<u64> = vec![1, 2, 3, u64::MAX];
    ns.lookup_or_insert_unique_in(0, &ids, 1).unwrap();
    ns.lookup_or_insert_unique_in(1, &ids, 1).unwrap();
    plain.lookup_or_insert(&ids, 1).unwrap();
    assert_eq!(ns.len(), 8);
    let read = |n: usize| {
        let rows = ns.lookup_in(n, &ids).unwrap();
        let mut out = vec![0.0; ids.len() * 4];
        ns.gather_in(n, &ids, &rows, Missing::Zeros, &mut out).unwrap();
        (rows, out)
    };
    let (r0, v0) = read(0);
    let (r1, v1) = read(1);
    assert!(r0.iter().zip(&r1).all(|(a, b)| a != b), "two namespaces share a row");
    assert_eq!(v0, gather(&plain, &ids, Missing::Zeros));
    let mut init1 = vec![0.0; ids.len() * 4];
    ns.initial_values_in(1, &ids, &mut init1).unwrap();
    assert_eq!(v1, init1);
    assert_ne!(v0, v1);
    assert!(ns.lookup_in(2, &ids).is_err());
}
