//! The sparse step of a group of features, in one home: the lookups of
//! several (table, namespace) id batches, the gather of their rows into one
//! `[U, dim]` block, and the optimizer update of the rows a step touched.
//! The bindings call these and nothing else for a group's step; a sharded
//! step calls the same functions on each side of its exchange.
//!
//! # Lock discipline
//!
//! Each physical table has one `RwLock` (see `table.rs`). The rules, which
//! together rule out the deadlock of a rayon worker that, waiting inside
//! one call, steals a task of another call on the same table:
//!
//! 1. **Locks are taken only at the top of a call, never inside a rayon
//!    task.** The work a call runs in parallel (dedup, probe, insert,
//!    gather, update) takes no table lock, so a worker that steals a task
//!    can never block on a lock, whoever holds it.
//! 2. **Each physical table is locked once per call**, whatever the number
//!    of its namespaces in the call, and the guards of several tables are
//!    taken in the order of their `uid`, so two calls never wait on each
//!    other in a cycle.
//! 3. **Growth and admission decay take the exclusive lock with no guard
//!    held by their own thread**: a lookup that finds a shard short of room
//!    drops every guard it holds, grows, and starts its locked phase again
//!    (the lock-free dedup is kept).
//!
//! The small `spare` mutex of a table is taken inside tasks, but only
//! around a `Vec::extend`: no work runs under it.
//!
//! The contract for callers: every public method of `HashTable` and every
//! function here locks at its top, so call them from plain threads, not
//! from inside rayon tasks that run other calls on the same table. Several
//! batches of one step are one call here (the bindings never nest them).
//!
//! # Tickets
//!
//! The rows of a trainable lookup leave the core as a [`Ticket`]: its rows
//! are distinct (one row per distinct id, namespaces never share rows) and
//! were live when looked up. While the table's epoch (bumped by eviction
//! and clear) is unchanged they still are, so the update of a ticket's rows
//! groups gradients by the linear counting sort and needs no check of its
//! own. Rows that come from anywhere else are checked and grouped by row.

use crate::batch::{BatchOut, GradRows, Prepared};
use crate::optim::SparseOptimizer;
use crate::pool::Bags;
use crate::table::{HashTable, Inner, Missing, TableError, UniqueLookup};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

type Result<T> = std::result::Result<T, TableError>;

/// One batch of ids of one namespace of one table.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub table: &'a HashTable,
    pub namespace: usize,
    pub ids: &'a [u64],
    /// Insert new ids (training) at this step; None: read only.
    pub insert: Option<u64>,
    /// How rows of ids without one read in a gather.
    pub missing: Missing,
}

impl<'a> Request<'a> {
    /// A read-only request; missing ids read as zeros.
    pub fn new(table: &'a HashTable, namespace: usize, ids: &'a [u64]) -> Self {
        Request { table, namespace, ids, insert: None, missing: Missing::Zeros }
    }

    /// Inserts new ids at `step`.
    pub fn insert(mut self, step: u64) -> Self {
        self.insert = Some(step);
        self
    }

    pub fn missing(mut self, missing: Missing) -> Self {
        self.missing = missing;
        self
    }
}

/// The rows a trainable lookup of one table handed out: distinct, and live
/// while the table's epoch is `epoch`.
#[derive(Debug, Clone)]
pub struct Ticket {
    table: u64,
    epoch: u64,
    rows: Vec<u32>,
    /// The `lookup_gather` call (block) it came from, and its rows there.
    block: u64,
    at: Range<usize>,
}

/// Identity of a `lookup_gather` call's block, unique in the process.
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);

impl Ticket {
    /// The rows of its block that are this ticket's (`rows()[k]` is block
    /// row `block_rows().start + k`).
    pub fn block_rows(&self) -> Range<usize> {
        self.at.clone()
    }

    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A group's block: every request's distinct rows gathered into one
/// `[U, dim]` array, request after request.
#[derive(Debug)]
pub struct Block {
    /// `[U, dim]`, row-major.
    pub values: Vec<f32>,
    /// For every input position of every request in order, its row of
    /// `values`.
    pub inverse: Vec<i64>,
    /// Each request's lookup (its `inverse` is local to the request).
    pub found: Vec<UniqueLookup>,
    /// One per maximal run of consecutive inserting requests of one table:
    /// (first request, end request, the run's rows as one ticket). The
    /// run's rows of `values` are contiguous, request after request.
    pub runs: Vec<(usize, usize, Ticket)>,
}

/// The distinct tables of `tables`, in lock order (by uid).
fn lock_order<'a>(tables: impl Iterator<Item = &'a HashTable>) -> Vec<&'a HashTable> {
    let mut out: Vec<&HashTable> = Vec::new();
    for t in tables {
        if !out.iter().any(|o| std::ptr::eq(*o, t)) {
            out.push(t);
        }
    }
    out.sort_by_key(|t| t.uid());
    out
}

fn position(order: &[&HashTable], t: &HashTable) -> usize {
    order.iter().position(|o| std::ptr::eq(*o, t)).expect("table in lock order")
}

/// Runs the lookups of `reqs` under one shared guard per table, then
/// `then(guards, results)` under the same guards (`guards[k]` is the guard
/// of `reqs[k]`'s table).
fn locked_lookups<R: Send>(
    reqs: &[Request<'_>],
    then: impl FnOnce(&[&Inner], Vec<UniqueLookup>) -> Result<R> + Send,
) -> Result<R> {
    // torch's OpenMP team sleeps while the rayon threads look up (omp.rs).
    crate::omp::parked(|| locked_lookups_now(reqs, then))
}

fn locked_lookups_now<R>(
    reqs: &[Request<'_>],
    then: impl FnOnce(&[&Inner], Vec<UniqueLookup>) -> Result<R>,
) -> Result<R> {
    let order = lock_order(reqs.iter().map(|r| r.table));
    // Admission decay first, holding nothing (rule 3).
    for t in &order {
        if let Some(step) = reqs.iter().filter(|r| std::ptr::eq(r.table, *t)).filter_map(|r| r.insert).max() {
            t.decay_admission(step);
        }
    }
    // Lock-free: each request's distinct ids per shard.
    let prepared: Vec<Prepared> =
        reqs.par_iter().map(|r| r.table.prepare(r.namespace, r.ids)).collect::<Result<_>>()?;
    let slot: Vec<usize> = reqs.iter().map(|r| position(&order, r.table)).collect();
    loop {
        let guards: Vec<RwLockReadGuard<'_, Inner>> = order.iter().map(|t| t.read_guard()).collect();
        let inner: Vec<&Inner> = slot.iter().map(|&k| &*guards[k]).collect();
        // Reserve id-map room for every inserting request; a shortfall
        // undoes the reservations, drops the guards and grows.
        let mut short: Option<(usize, Vec<(usize, usize)>)> = None;
        let mut reserved = Vec::new();
        for (k, r) in reqs.iter().enumerate() {
            if r.insert.is_some() {
                match r.table.reserve(inner[k], &prepared[k]) {
                    Ok(()) => reserved.push(k),
                    Err(s) => {
                        short = Some((k, s));
                        break;
                    }
                }
            }
        }
        if let Some((k, _)) = short {
            for &j in &reserved {
                let none = BatchOut::nothing_inserted(&prepared[j]);
                reqs[j].table.unreserve(inner[j], &prepared[j], &none);
            }
            drop(inner);
            drop(guards);
            // Room for every inserting request of that table at once (two
            // requests may share a shard), so the retry fits.
            let table = reqs[k].table;
            let need: Vec<(usize, usize)> = reqs
                .iter()
                .zip(&prepared)
                .filter(|(r, _)| r.insert.is_some() && std::ptr::eq(r.table, table))
                .flat_map(|(r, p)| r.table.needs(p))
                .collect();
            table.grow(&need);
            continue;
        }
        let outs: Vec<BatchOut> =
            reqs.par_iter().zip(&prepared).zip(&inner).map(|((r, p), g)| r.table.process(g, p, r.insert)).collect();
        let mut found = Vec::with_capacity(outs.len());
        let mut error = None;
        for (k, out) in outs.into_iter().enumerate() {
            if reqs[k].insert.is_some() {
                reqs[k].table.unreserve(inner[k], &prepared[k], &out);
            }
            if error.is_none() {
                error = out.error;
            }
            found.push(out.result);
        }
        if let Some(e) = error {
            return Err(e);
        }
        return then(&inner, found);
    }
}

/// The lookups of several (table, namespace) batches in one call, in
/// parallel; a table may appear several times (its namespaces). Results
/// come in the order of `reqs`.
pub fn lookup_many(reqs: &[Request<'_>]) -> Result<Vec<UniqueLookup>> {
    locked_lookups(reqs, |_, found| Ok(found))
}

/// [`lookup_many`] and the gather of every request's distinct rows into one
/// block, under the same guards: the rows gathered are the rows looked up.
/// Every table must have the same dim.
pub fn lookup_gather(reqs: &[Request<'_>]) -> Result<Block> {
    let Some(first) = reqs.first() else {
        return Err(TableError::InvalidArgument("lookup_gather: no requests".into()));
    };
    let dim = first.table.dim();
    if let Some(k) = reqs.iter().position(|r| r.table.dim() != dim) {
        return Err(TableError::InvalidArgument(format!(
            "lookup_gather: request {k}'s table has dim {}, request 0's has {dim}",
            reqs[k].table.dim()
        )));
    }
    locked_lookups(reqs, |inner, found| {
        let total: usize = found.iter().map(|u| u.rows.len()).sum();
        let positions: usize = found.iter().map(|u| u.inverse.len()).sum();
        let mut values = vec![0.0f32; total * dim];
        let mut inverse = vec![0i64; positions];
        // Each request's share of the block and of the positions.
        let mut parts = Vec::with_capacity(reqs.len());
        let (mut vrest, mut irest) = (&mut values[..], &mut inverse[..]);
        let mut lo = 0usize;
        for u in &found {
            let (v, vr) = std::mem::take(&mut vrest).split_at_mut(u.rows.len() * dim);
            let (iv, ir) = std::mem::take(&mut irest).split_at_mut(u.inverse.len());
            parts.push((v, iv, lo));
            lo += u.rows.len();
            vrest = vr;
            irest = ir;
        }
        parts.into_par_iter().enumerate().for_each(|(k, (v, iv, lo))| {
            let u = &found[k];
            for (o, &i) in iv.iter_mut().zip(&u.inverse) {
                *o = (lo + i as usize) as i64;
            }
            let r = &reqs[k];
            // The rows were looked up under the guard still held: live.
            r.table.gather_live(inner[k], r.namespace, &u.ids, &u.rows, r.missing, v);
        });
        let mut runs = Vec::new();
        let block = NEXT_BLOCK.fetch_add(1, Ordering::Relaxed);
        let starts: Vec<usize> = found
            .iter()
            .scan(0usize, |at, u| {
                let lo = *at;
                *at += u.rows.len();
                Some(lo)
            })
            .collect();
        let mut k = 0;
        while k < reqs.len() {
            if reqs[k].insert.is_none() {
                k += 1;
                continue;
            }
            // A run's namespaces are distinct, so its rows are: a namespace
            // that comes again starts a new run (and ticket).
            let mut end = k + 1;
            while end < reqs.len()
                && reqs[end].insert.is_some()
                && std::ptr::eq(reqs[end].table, reqs[k].table)
                && !reqs[k..end].iter().any(|r| r.namespace == reqs[end].namespace)
            {
                end += 1;
            }
            let rows: Vec<u32> = found[k..end].iter().flat_map(|u| u.rows.iter().copied()).collect();
            let at = starts[k]..starts[k] + rows.len();
            runs.push((k, end, Ticket { table: reqs[k].table.uid(), epoch: inner[k].epoch(), rows, block, at }));
            k = end;
        }
        Ok(Block { values, inverse, found, runs })
    })
}

/// The rows of an update: tickets of the table's lookups (concatenated in
/// order), or rows from elsewhere.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    Tickets(&'a [&'a Ticket]),
    Any(&'a [u32]),
}

/// One optimizer step of one table: `grads[k]` (`dim` values) belongs to
/// row `rows[index[k]]`; gradients of one row are summed first.
#[derive(Clone, Copy)]
pub struct Update<'a> {
    pub table: &'a HashTable,
    pub rows: Rows<'a>,
    pub index: &'a [u32],
    pub grads: &'a [f32],
    pub step: u64,
}

/// Applies several tables' updates in one call: one exclusive guard per
/// table (in lock order), the tables in parallel, several updates of one
/// table one after another. Returns each update's outcome; an update that
/// fails leaves its table unchanged.
pub fn apply_many(updates: &[Update<'_>], opt: &SparseOptimizer, lr: f32) -> Vec<Result<()>> {
    apply_each(updates, |_| (opt, lr))
}

/// [`apply_many`] with each update's own optimizer and lr (`opt_of(k)`).
fn apply_each<'o>(
    updates: &[Update<'_>],
    opt_of: impl Fn(usize) -> (&'o SparseOptimizer, f32) + Sync + Send,
) -> Vec<Result<()>> {
    crate::omp::parked(|| apply_each_now(updates, opt_of))
}

fn apply_each_now<'o>(
    updates: &[Update<'_>],
    opt_of: impl Fn(usize) -> (&'o SparseOptimizer, f32) + Sync,
) -> Vec<Result<()>> {
    let order = lock_order(updates.iter().map(|u| u.table));
    let mut guards: Vec<RwLockWriteGuard<'_, Inner>> = order.iter().map(|t| t.write_guard()).collect();
    // The exclusively locked state of each table: the tasks below write its
    // rows through the row store (`Inner::update_rows`), one task a table.
    // They take no lock (rule 1).
    let mut inner: Vec<&mut Inner> = guards.iter_mut().map(|g| &mut **g).collect();
    let mut by_table: Vec<Vec<usize>> = vec![Vec::new(); order.len()];
    for (k, u) in updates.iter().enumerate() {
        by_table[position(&order, u.table)].push(k);
    }
    let done: Vec<Vec<(usize, Result<()>)>> = inner
        .par_iter_mut()
        .zip(&by_table)
        .map(|(g, ks)| {
            ks.iter()
                .map(|&k| {
                    let (opt, lr) = opt_of(k);
                    (k, apply_one(g, &updates[k], opt, lr))
                })
                .collect()
        })
        .collect();
    drop(inner);
    drop(guards);
    let mut out: Vec<Option<Result<()>>> = (0..updates.len()).map(|_| None).collect();
    for (k, r) in done.into_iter().flatten() {
        out[k] = Some(r);
    }
    out.into_iter().map(|r| r.expect("every update ran")).collect()
}

/// A ticket may update `table` under `inner`: it is the table's and its
/// rows are still live (no eviction or clear since).
fn check_ticket(t: &Ticket, table: &HashTable, inner: &Inner) -> Result<()> {
    if t.table != table.uid() {
        return Err(TableError::InvalidArgument("a ticket of another table was passed to this table's update".into()));
    }
    if t.epoch != inner.epoch() {
        return Err(TableError::InvalidArgument(
            "the table was evicted or cleared since these rows were looked up; their gradients are dropped (call \
             the optimizer's step before evict)"
                .into(),
        ));
    }
    Ok(())
}

fn apply_one(inner: &mut Inner, u: &Update<'_>, opt: &SparseOptimizer, lr: f32) -> Result<()> {
    let grads = u.grads;
    match u.rows {
        Rows::Any(rows) => u.table.apply_locked(inner, GradRows::Any(rows), u.index, grads, opt, lr, u.step),
        Rows::Tickets(ts) => {
            for t in ts {
                check_ticket(t, u.table, inner)?;
            }
            if let [t] = ts {
                u.table.apply_locked(inner, GradRows::Distinct(&t.rows), u.index, grads, opt, lr, u.step)
            } else {
                // Several lookups of one table: rows may repeat.
                let rows: Vec<u32> = ts.iter().flat_map(|t| t.rows.iter().copied()).collect();
                u.table.apply_locked(inner, GradRows::Any(&rows), u.index, grads, opt, lr, u.step)
            }
        }
    }
}

/// One table's share of a pooled block, for [`apply_pooled`]: a ticket of
/// the block's `lookup_gather` (it knows its rows of the block).
#[derive(Clone)]
pub struct PooledPart<'a> {
    pub table: &'a HashTable,
    pub ticket: &'a Ticket,
    pub opt: &'a SparseOptimizer,
    pub lr: f32,
    pub step: u64,
}

/// The optimizer update fused with the pooling's backward (optimizer in
/// backward): from `grad`, the gradient of the pooled output of `bags`
/// (`[batch, features, dim]`) over the block of one `lookup_gather` call,
/// the summed gradient of every block row (`Bags::backward`, before any
/// lock, into a scratch buffer of the call) and each table's update from
/// it, under one exclusive guard per table in lock order, the tables in
/// parallel. A table's parts are one update (their gradients summed per
/// row, as `apply_many` sums several tickets), so a table is updated whole
/// or not at all. Every ticket must come from the block the bags pool.
/// Returns each part's outcome (a table's parts share theirs); a table
/// that fails (a non-finite row gradient, a stale ticket, ...) is
/// unchanged. No gradient leaves the core.
pub fn apply_pooled(bags: &Bags<'_>, grad: &[f32], dim: usize, parts: &[PooledPart<'_>]) -> Vec<Result<()>> {
    // One parked region for the backward and the update (omp.rs).
    crate::omp::parked(|| apply_pooled_now(bags, grad, dim, parts))
}

fn apply_pooled_now(bags: &Bags<'_>, grad: &[f32], dim: usize, parts: &[PooledPart<'_>]) -> Vec<Result<()>> {
    let rows = bags.rows();
    let fail_all = |e: TableError| parts.iter().map(|_| Err(e.clone())).collect();
    if let Some(first) = parts.first() {
        if let Some(k) = parts.iter().position(|p| p.ticket.block != first.ticket.block) {
            return fail_all(TableError::InvalidArgument(format!(
                "part {k}'s ticket comes from another lookup than part 0's; a fused update takes one block's tickets"
            )));
        }
    }
    let mut gw = vec![0.0f32; rows * dim];
    if let Err(e) = bags.backward(grad, dim, &mut gw) {
        return fail_all(TableError::InvalidArgument(e));
    }
    // One update per table, as `apply_many` takes it: the table's tickets
    // in order, and their rows of `gw` (a slice for one ticket, gathered
    // for several).
    let mut tables: Vec<&HashTable> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (k, p) in parts.iter().enumerate() {
        match tables.iter().position(|t| std::ptr::eq(*t, p.table)) {
            Some(i) => members[i].push(k),
            None => {
                tables.push(p.table);
                members.push(vec![k]);
            }
        }
    }
    let prepared: Vec<Result<Share>> = members
        .iter()
        .map(|ks| {
            let p = &parts[ks[0]];
            for &k in ks {
                check_part(rows, dim, &parts[k])?;
                let q = &parts[k];
                if q.opt != p.opt || q.lr != p.lr || q.step != p.step {
                    return Err(TableError::InvalidArgument(
                        "the parts of one table must share its optimizer, lr and step".into(),
                    ));
                }
            }
            let tickets: Vec<&Ticket> = ks.iter().map(|&k| parts[k].ticket).collect();
            let grads: Vec<f32> = if tickets.len() == 1 {
                Vec::new() // `gw`'s slice, below
            } else {
                tickets.iter().flat_map(|t| gw[t.at.start * dim..t.at.end * dim].iter().copied()).collect()
            };
            let n = tickets.iter().map(|t| t.len()).sum::<usize>() as u32;
            Ok(Share { tickets, index: (0..n).collect(), gathered: grads })
        })
        .collect();
    let ready: Vec<usize> = (0..tables.len()).filter(|&i| prepared[i].is_ok()).collect();
    let updates: Vec<Update> = ready
        .iter()
        .map(|&i| {
            let Share { tickets, index, gathered } = prepared[i].as_ref().expect("ready");
            let grads = match tickets[..] {
                [t] => &gw[t.at.start * dim..t.at.end * dim],
                _ => &gathered[..],
            };
            let p = &parts[members[i][0]];
            Update { table: tables[i], rows: Rows::Tickets(tickets), index, grads, step: p.step }
        })
        .collect();
    let done = apply_each(&updates, |u| {
        let p = &parts[members[ready[u]][0]];
        (p.opt, p.lr)
    });
    let mut outcome: Vec<Result<()>> = prepared.into_iter().map(|r| r.map(|_| ())).collect();
    for (u, r) in done.into_iter().enumerate() {
        outcome[ready[u]] = r;
    }
    let mut out: Vec<Option<Result<()>>> = (0..parts.len()).map(|_| None).collect();
    for (i, ks) in members.iter().enumerate() {
        for &k in ks {
            out[k] = Some(outcome[i].clone());
        }
    }
    out.into_iter().map(|r| r.expect("every part has a table")).collect()
}

/// One table's update in [`apply_pooled`]: its tickets, an identity index
/// and, for several tickets, their rows of the block's gradient gathered.
struct Share<'a> {
    tickets: Vec<&'a Ticket>,
    index: Vec<u32>,
    gathered: Vec<f32>,
}

/// A part's ticket's rows lie inside the block and the table has the
/// block's dim.
fn check_part(rows: usize, dim: usize, p: &PooledPart<'_>) -> Result<()> {
    let bad = |m: String| Err(TableError::InvalidArgument(m));
    if p.table.dim() != dim {
        return bad(format!("the table has dim {} but the block has dim {dim}", p.table.dim()));
    }
    let at = p.ticket.block_rows();
    if at.end > rows {
        return bad(format!("the ticket's rows {at:?} are not inside the block's {rows} rows"));
    }
    Ok(())
}
