//! Replays a file of batches through the training lookup (`lookup_gather`
//! with insert) of one coalesced table, one namespace a feature, and times
//! each call three ways: inserting, again with every id stored, read-only.
//! The file: u64 little-endian words: batches, features; then per batch the
//! per-feature id counts and the ids. `benches/peer_phases.py --dump FILE`
//! writes the shared harness's batches in this form.
//!
//! `cargo run --release -p recis-core --example replay -- FILE [adam|rowwise] [warmup]`

use recis_core::pipeline::{lookup_gather, Request};
use recis_core::{HashTable, Initializer, SparseOptimizer, TableConfig};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().expect("a batch file");
    let optim = args.get(1).map(String::as_str).unwrap_or("adam");
    let warmup: usize = args.get(2).map(|s| s.parse().expect("a number")).unwrap_or(12);
    let bytes = std::fs::read(path).expect("readable batch file");
    let words: Vec<u64> = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let (nb, nt) = (words[0] as usize, words[1] as usize);
    let mut at = 2;
    let mut batches: Vec<Vec<Vec<u64>>> = Vec::with_capacity(nb);
    for _ in 0..nb {
        let lens: Vec<usize> = words[at..at + nt].iter().map(|&n| n as usize).collect();
        at += nt;
        let mut feats = Vec::with_capacity(nt);
        for n in lens {
            feats.push(words[at..at + n].to_vec());
            at += n;
        }
        batches.push(feats);
    }
    let dim = 16;
    let mut cfg = TableConfig::new(dim);
    cfg.initializer = Initializer::Uniform { low: -0.01, high: 0.01 };
    cfg.namespace_seeds = (0..nt as u64).collect();
    let table = HashTable::new(cfg).unwrap();
    let opt = if optim == "adam" {
        SparseOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    } else {
        SparseOptimizer::RowWiseAdagrad { eps: 1e-10, weight_decay: 0.0, initial_accumulator: 0.0 }
    };
    table.set_slots(opt.slot_width(dim), opt.slot_init()).unwrap();
    rayon::broadcast(|_| ());
    let mut spent = [Vec::new(), Vec::new(), Vec::new()];
    for (step, feats) in batches.iter().enumerate() {
        let reqs = |insert: bool| -> Vec<Request<'_>> {
            feats
                .iter()
                .enumerate()
                .map(|(ns, ids)| {
                    let r = Request::new(&table, ns, ids);
                    if insert {
                        r.insert(step as u64)
                    } else {
                        r
                    }
                })
                .collect()
        };
        let t0 = Instant::now();
        let b = lookup_gather(&reqs(true)).unwrap();
        let t1 = Instant::now();
        drop(b);
        let t1b = Instant::now();
        let b = lookup_gather(&reqs(true)).unwrap();
        let t2 = Instant::now();
        drop(b);
        let t2b = Instant::now();
        let b = lookup_gather(&reqs(false)).unwrap();
        let t3 = Instant::now();
        drop(b);
        if step >= warmup {
            spent[0].push((t1 - t0).as_secs_f64());
            spent[1].push((t2 - t1b).as_secs_f64());
            spent[2].push((t3 - t2b).as_secs_f64());
        }
    }
    for (name, v) in ["inserting", "again, every id stored", "read-only"].iter().zip(spent.iter_mut()) {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("  {name:24} {:7.2} ms median, {:7.2} ms mean", v[v.len() / 2] * 1e3, mean * 1e3);
    }
    println!("  {} rows, {} threads", table.len(), rayon::current_num_threads());
}
