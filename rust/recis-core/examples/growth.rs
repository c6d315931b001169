//! Growth from a small start to tens of millions of ids: the time of every
//! batch (so that a pause from growth would show as an outlier) and the
//! table's memory per id as it grows.
//!
//! `cargo run --release -p recis-core --example growth -- [total_ids] [batch] [dim]`
//! (defaults: 20,000,000 ids, batches of 65,536, dim 16 with Adam slots)

use recis_core::hash::mix64;
use recis_core::{HashTable, Initializer, SparseOptimizer, TableConfig};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let total = *args.first().unwrap_or(&20_000_000);
    let batch = *args.get(1).unwrap_or(&65_536);
    let dim = *args.get(2).unwrap_or(&16);
    let mut cfg = TableConfig::new(dim);
    cfg.initializer = Initializer::Uniform { low: -0.01, high: 0.01 };
    // The default small start: 16k ids.
    let table = HashTable::new(cfg).unwrap();
    let opt = SparseOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    table.set_slots(opt.slot_width(dim), opt.slot_init()).unwrap();
    println!(
        "inserting {total} new 63-bit ids in batches of {batch} (dim {dim}, {} slot floats), {} threads",
        opt.slot_width(dim),
        rayon::current_num_threads()
    );
    // Start the thread pool before timing, so batch 0 measures the table.
    rayon::broadcast(|_| ());
    let mut times = Vec::new();
    let mut next = 0u64;
    while (next as usize) < total {
        let n = batch.min(total - next as usize) as u64;
        let ids: Vec<u64> = (next..next + n).map(|i| mix64(i) >> 1).collect();
        next += n;
        let t0 = Instant::now();
        table.lookup_or_insert_unique(&ids, 0).unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        if next.is_power_of_two() || next as usize >= total {
            let s = table.stats();
            println!(
                "{:>11} ids: overhead {:5.1} B/id (id map {:5.1}, meta {:3.1}, other {:3.1}); row {} B",
                s.len,
                s.overhead_bytes_per_id(),
                s.id_map_bytes as f64 / s.len as f64,
                s.meta_bytes as f64 / s.len as f64,
                s.other_bytes as f64 / s.len as f64,
                (dim + opt.slot_width(dim)) * 4,
            );
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p) as usize];
    let worst = times.iter().cloned().enumerate().max_by(|a, b| a.1.partial_cmp(&b.1).unwrap()).unwrap();
    println!(
        "batch time (ms): median {:.2}, p99 {:.2}, max {:.2} (batch {} of {}); max / median {:.1}",
        pct(0.5),
        pct(0.99),
        worst.1,
        worst.0,
        times.len(),
        worst.1 / pct(0.5)
    );
    let s = table.stats();
    println!(
        "final: {} ids, {:.1} MiB in use ({:.1} B/id overhead), {:.1} MiB of row segments reserved",
        s.len,
        s.total_bytes() as f64 / 1048576.0,
        s.overhead_bytes_per_id(),
        s.reserved_bytes as f64 / 1048576.0
    );
}
