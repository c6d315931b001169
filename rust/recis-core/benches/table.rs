//! Lookup (hits) and insert throughput of the RecIS table against hashbrown's
//! HashMap on the same keys, with 1 and 2 threads, at 10M ids.
//!
//! Peers: for lookups, one `hashbrown::HashMap<u64, u32>` read by every thread
//! (it is `Sync`); for inserts, hashbrown can only be written by one thread at
//! a time, so with N threads it is N maps, one per thread, each fed keys that
//! were partitioned by hash in advance (the partition is not timed) — the
//! best case for it. RecIS does its own partitioning inside the timed call.
//!
//! `cargo bench -p recis-core --bench table`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use recis_core::hash::mix64;
use recis_core::{HashTable, TableConfig};
use std::hint::black_box;

const TABLE_IDS: usize = 10_000_000;
const BATCH: usize = 65_536;

fn keys(n: usize, salt: u64) -> Vec<u64> {
    (0..n as u64).map(|i| mix64(i ^ salt) >> 1).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

fn recis_table() -> HashTable {
    // dim 1: the id map and row allocation are measured, not embedding copies.
    let mut cfg = TableConfig::new(1);
    cfg.initializer = recis_core::Initializer::Constant(0.0);
    HashTable::new(cfg).unwrap()
}

fn bench_lookup(c: &mut Criterion) {
    let all = keys(TABLE_IDS, 1);
    let table = recis_table();
    for chunk in all.chunks(BATCH) {
        table.lookup_or_insert(chunk, 0).unwrap();
    }
    let map: hashbrown::HashMap<u64, u32> = all.iter().enumerate().map(|(i, &k)| (k, i as u32)).collect();
    // Random hits: a batch drawn uniformly from the 10M stored ids.
    let probe: Vec<u64> = (0..BATCH as u64).map(|i| all[(mix64(i ^ 99) % TABLE_IDS as u64) as usize]).collect();
    let mut g = c.benchmark_group("lookup_hits_10M");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);
    for threads in [1, 2] {
        let p = pool(threads);
        g.bench_with_input(BenchmarkId::new("recis", threads), &threads, |b, _| {
            b.iter(|| p.install(|| black_box(table.lookup(&probe).unwrap())))
        });
        g.bench_with_input(BenchmarkId::new("hashbrown", threads), &threads, |b, _| {
            b.iter(|| {
                p.install(|| {
                    let rows: Vec<u32> = probe.par_iter().with_min_len(1024).map(|k| *map.get(k).unwrap()).collect();
                    black_box(rows)
                })
            })
        });
    }
    g.finish();
}

fn bench_insert(c: &mut Criterion) {
    let all = keys(TABLE_IDS, 2);
    let mut g = c.benchmark_group("insert_10M");
    g.throughput(Throughput::Elements(TABLE_IDS as u64));
    g.sample_size(10);
    for threads in [1usize, 2] {
        let p = pool(threads);
        g.bench_with_input(BenchmarkId::new("recis", threads), &threads, |b, _| {
            b.iter_with_large_drop(|| {
                p.install(|| {
                    let t = recis_table();
                    for chunk in all.chunks(BATCH) {
                        black_box(t.lookup_or_insert(chunk, 0).unwrap());
                    }
                    t
                })
            })
        });
        // One map per thread, keys partitioned by hash beforehand.
        let parts: Vec<Vec<u64>> = (0..threads)
            .map(|t| all.iter().copied().filter(|&k| (mix64(k) % threads as u64) as usize == t).collect())
            .collect();
        g.bench_with_input(BenchmarkId::new("hashbrown", threads), &threads, |b, _| {
            b.iter_with_large_drop(|| {
                p.install(|| {
                    parts
                        .par_iter()
                        .map(|keys| {
                            let mut m: hashbrown::HashMap<u64, u32> = hashbrown::HashMap::new();
                            let mut next = 0u32;
                            for chunk in keys.chunks(BATCH / threads) {
                                let rows: Vec<u32> = chunk
                                    .iter()
                                    .map(|&k| {
                                        *m.entry(k).or_insert_with(|| {
                                            next += 1;
                                            next - 1
                                        })
                                    })
                                    .collect();
                                black_box(rows);
                            }
                            m
                        })
                        .collect::<Vec<_>>()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_lookup, bench_insert);
criterion_main!(benches);
