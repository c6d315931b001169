"""Where a RecIS step of the shared harness's workload goes, and the
machine's physical floor for it. The workload and batches are the harness's
own (``../shared/bench/peer_step.py``, imported, not copied): 8 features,
batch 4096, Zipf(1.05) over 10M ids, dim 16.

    .venv/bin/python benches/peer_phases.py --optim adam       # phase table
    .venv/bin/python benches/peer_phases.py --in-backward      # ... with the update fused into backward
    .venv/bin/python benches/peer_phases.py --mode lookup      # insert / hit / read-only
    .venv/bin/python benches/peer_phases.py --mode update      # backward + update, against fused
    .venv/bin/python benches/peer_phases.py --mode floor       # random-row bandwidth
    .venv/bin/python benches/peer_phases.py --dump /tmp/ids.bin   # batches for examples/replay.rs

``phases`` times the harness's RecIS loop (``stacked``; loss; backward;
``step``; dense step; ``zero_grad``) phase by phase, median over the steps
after 12 warm-up steps. ``lookup`` times the group's one native call on the
same ids three ways: inserting (the training call; on alternate steps right
after a torch op or with torch idle), again with every id stored, and
read-only. ``floor`` times torch's ``index_select`` and
``index_add_`` of 35.6k random rows (the harness's distinct ids a step) of a
2M-row table, at 192 and 68 bytes a row (Adam, row-wise Adagrad)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

HARNESS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")


def harness():
    if not os.path.exists(os.path.join(HARNESS, "peer_step.py")):
        sys.exit(f"peer_phases: the shared harness is not at {HARNESS}")
    sys.path.insert(0, HARNESS)
    import peer_step

    return peer_step


def engine_and_optimizer(ps, optim, in_backward=False):
    from recis.nn import EmbeddingEngine, EmbeddingOption, UniformInit
    from recis.optim import SparseAdam, SparseRowWiseAdagrad

    engine = EmbeddingEngine({k: EmbeddingOption(dim=ps.DIM, initializer=UniformInit(-0.01, 0.01)) for k in ps.KEYS})
    if optim == "adam":
        opt = SparseAdam(engine, lr=1e-3, in_backward=in_backward)
    else:
        opt = SparseRowWiseAdagrad(engine, lr=0.01, in_backward=in_backward)
    return engine, opt


def per_table(ps, b):
    lens = b["lengths"].view(ps.NT, ps.B)
    return lens, torch.split(b["raw"], lens.sum(1).tolist())


def phases(ps, args):
    from recis.ragged import RaggedTensor

    batches = ps.make_batches(args.steps)
    engine, sopt = engine_and_optimizer(ps, args.optim, args.in_backward)
    head, hopt = ps.dense_head()
    lossf = torch.nn.BCEWithLogitsLoss()
    names = ["stacked (lookup/insert + gather + pool)", "head + loss", "backward", "sparse step", "dense step"]
    spent = {n: [] for n in names}
    for i, b in enumerate(batches):
        lens, vals = per_table(ps, b)
        feats = {k: RaggedTensor.from_lengths(vals[t], lens[t]) for t, k in enumerate(ps.KEYS)}
        t = [time.perf_counter()]
        pooled = engine.stacked(feats, ps.KEYS).flatten(1)
        t.append(time.perf_counter())
        loss = lossf(head(pooled).squeeze(1), b["label"])
        t.append(time.perf_counter())
        hopt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        sopt.step()
        t.append(time.perf_counter())
        hopt.step()
        sopt.zero_grad()
        t.append(time.perf_counter())
        if i >= args.warmup:
            for n, a, z in zip(names, t, t[1:], strict=False):
                spent[n].append(z - a)
    # The harness times whole runs of steps: the mean is its figure; the
    # median hides the steps that grow the table.
    total, total_mean = 0.0, 0.0
    print(f"  {'':42s} {'median':>7s}    {'mean':>7s}")
    for n, v in spent.items():
        m, a = statistics.median(v) * 1e3, statistics.fmean(v) * 1e3
        total += m
        total_mean += a
        print(f"  {n:42s} {m:7.2f} ms {a:7.2f} ms")
    print(
        f"  {'total':42s} {total:7.2f} ms {total_mean:7.2f} ms -> {ps.B / total_mean * 1e3:,.0f} samples/s "
        f"(mean); {len(engine.tables()[0]):,} rows"
    )


def lookup(ps, args):
    """Even steps split the ids with torch right before the timed call, as
    the training step does; odd steps split them beforehand, so torch's
    OpenMP workers are idle (or still spinning: see BENCHMARKS.md) when the
    call starts."""
    from recis.nn.hash_table import lookup_gather

    batches = ps.make_batches(args.steps)
    engine, _ = engine_and_optimizer(ps, args.optim)
    views = [engine.table(k) for k in ps.KEYS]
    n = len(views)
    spent = {
        "inserting, after a torch op": [],
        "inserting, torch idle": [],
        "again, every id stored": [],
        "read-only": [],
    }
    for i, b in enumerate(batches):
        after_torch = i % 2 == 0
        if not after_torch:
            ids = [v.numpy() for v in per_table(ps, b)[1]]
            time.sleep(0.02)
        t0 = time.perf_counter()
        if after_torch:
            ids = [v.numpy() for v in per_table(ps, b)[1]]
        _, _, sizes, _ = lookup_gather(views, ids, [True] * n, [True] * n)
        t1 = time.perf_counter()
        lookup_gather(views, ids, [True] * n, [True] * n)
        t2 = time.perf_counter()
        lookup_gather(views, ids, [False] * n, [True] * n)
        t3 = time.perf_counter()
        engine.tables()[0].step += 1
        if i >= args.warmup:
            first = "inserting, after a torch op" if after_torch else "inserting, torch idle"
            for k, d in zip((first, "again, every id stored", "read-only"), (t1 - t0, t2 - t1, t3 - t2), strict=True):
                spent[k].append(d)
    for k, v in spent.items():
        print(f"  {k:28s} {statistics.median(v) * 1e3:7.2f} ms")
    print(f"  {sum(sizes):,} distinct ids in the last step; {len(engine.tables()[0]):,} rows")


def dump(ps, args):
    """Writes the harness's batches for ``rust/recis-core/examples/replay.rs``:
    u64 little-endian words: batches, features; then per batch the
    per-feature id counts and the ids."""
    batches = ps.make_batches(args.steps)
    words = [np.array([len(batches), ps.NT], np.uint64)]
    for b in batches:
        vals = per_table(ps, b)[1]
        words.append(np.array([len(v) for v in vals], np.uint64))
        words.extend(v.numpy().astype(np.uint64) for v in vals)
    with open(args.dump, "wb") as f:
        f.write(np.concatenate(words).astype("<u8").tobytes())
    print(f"  {len(batches)} batches of {ps.NT} features to {args.dump}")


def update(ps, args):
    """The sparse update of the harness's blocks two ways, alternating step
    by step on one table: the pooling's backward into a [rows, dim] gradient
    then the deferred update (two native calls), against the update fused
    into backward (one native call, ``apply_pooled``)."""
    from recis import _native
    from recis.nn.hash_table import lookup_gather

    batches = ps.make_batches(args.steps)
    engine, opt = engine_and_optimizer(ps, args.optim)
    table, views = engine.tables()[0], [engine.table(k) for k in ps.KEYS]
    kernel, n = opt._kernel(opt.param_groups[0]), len(views)
    rng = np.random.default_rng(0)
    spent = {"backward, then update": [], "fused update": []}
    for i, b in enumerate(batches):
        lens, vals = per_table(ps, b)
        block, inverse, _sizes, runs = lookup_gather(views, [v.numpy() for v in vals], [True] * n, [True] * n)
        offsets = np.concatenate([[0], np.cumsum(lens.reshape(-1).numpy())]).astype(np.int64)
        grad = rng.random((ps.B, ps.NT, ps.DIM), dtype=np.float32)
        ticket, rows = runs[0][2], block.shape[0]
        t0 = time.perf_counter()
        if i % 2 == 0:
            gw = np.empty((rows, ps.DIM), np.float32)
            _native.pool_backward(grad, inverse, offsets, None, False, ps.NT, gw)
            _native.apply_gradients_many([table.native], [[ticket]], [np.arange(rows)], [gw], kernel, 0.01, [1])
            key = "backward, then update"
        else:
            one = ([table.native], [ticket], [kernel], [0.01], [1])
            _native.apply_pooled(grad, inverse, offsets, None, False, ps.NT, rows, *one)
            key = "fused update"
        if i >= args.warmup:
            spent[key].append(time.perf_counter() - t0)
        table.step += 1
    for k, v in spent.items():
        print(f"  {k:24s} {statistics.median(v) * 1e3:7.2f} ms")


def floor(ps, args):
    rng = np.random.default_rng(0)
    rows, distinct = 2_000_000, 35_610
    for width in (48, 17):
        a = torch.ones(rows, width)
        out = {}
        for name in ("read", "read-modify-write"):
            ts = []
            for _ in range(30):
                idx = torch.from_numpy(rng.choice(rows, distinct, replace=False))
                t0 = time.perf_counter()
                if name == "read":
                    a.index_select(0, idx)
                else:
                    a.index_add_(0, idx, torch.ones(distinct, width))
                ts.append(time.perf_counter() - t0)
            med = statistics.median(ts[5:])
            moved = distinct * width * 4 * (1 if name == "read" else 2)
            out[name] = f"{med * 1e3:.2f} ms ({moved / med / 1e9:.2f} GB/s)"
        print(f"  {width * 4} B rows: random read {out['read']}, random read-modify-write {out['read-modify-write']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["phases", "lookup", "update", "floor"], default="phases")
    ap.add_argument("--optim", choices=["adam", "rowwise"], default="adam")
    ap.add_argument("--in-backward", action="store_true", help="the sparse update inside backward (fused)")
    ap.add_argument("--steps", type=int, default=112)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--dump", metavar="FILE", help="write the batches for the Rust replay example, and stop")
    args = ap.parse_args()
    ps = harness()
    torch.set_num_threads(2)
    print(
        f"{args.mode} ({args.optim}), torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    if args.dump:
        return dump(ps, args)
    {"phases": phases, "lookup": lookup, "update": update, "floor": floor}[args.mode](ps, args)


if __name__ == "__main__":
    main()
