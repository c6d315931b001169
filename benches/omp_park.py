"""Parking torch's OpenMP team during RecIS's native calls, on and off, in
one process: the shared harness's contenders (``../shared/bench/peer_step.py``,
imported, not copied: its batches, its steps, its interleaving), each RecIS
contender twice, with parking on (``recis_*``) and off (``recis_*_spin``;
``recis._native.openmp_parking(False)`` around its runs). Each run times
every contender in turn over the same steps, so a slow patch of the shared
machine slows all of them; the ratios are medians of per-run ratios.

    cd ../shared && ../main/.venv/bin/python ../main/benches/omp_park.py
    ... --variants plain_sparseadam,trec_fused_ebc,recis_adam,recis_rowwise_adagrad --runs 7

See ``recis-core``'s ``omp`` module for what parking is, and BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="plain_sparseadam,trec_fused_ebc,recis_adam,recis_rowwise_adagrad")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--nbatches", type=int, default=0, help="0: a fresh batch every step, as the harness")
    args = ap.parse_args()
    if args.nbatches == 0:
        args.nbatches = args.warmup + args.steps * args.runs
    if not os.path.exists(os.path.join(HARNESS, "peer_step.py")):
        sys.exit(f"omp_park: the shared harness is not at {HARNESS}")
    sys.path.insert(0, HARNESS)
    import peer_step as ps

    from recis import _native

    if not _native.openmp_parking():
        sys.exit("omp_park: no OpenMP team to park here (libgomp not loaded, or RECIS_OMP_PARK=0)")
    batches = ps.make_batches(args.nbatches)
    names, steps, park = [], {}, {}
    for v in args.variants.split(","):
        if v not in ps.VARIANTS:
            sys.exit(f"omp_park: unknown variant {v!r} (the harness has {sorted(ps.VARIANTS)})")
        runs = [(v, True), (v + "_spin", False)] if v.startswith("recis") else [(v, None)]
        for name, on in runs:
            names.append(name)
            steps[name] = ps.VARIANTS[v](batches)
            park[name] = on

    def run(name: str, start: int, n: int) -> float:
        if park[name] is not None:
            _native.openmp_parking(park[name])
        t0 = time.perf_counter()
        for j in range(n):
            steps[name]((start + j) % args.nbatches)
        _native.openmp_parking(True)
        return n / (time.perf_counter() - t0)

    print(f"torch {torch.__version__} threads={torch.get_num_threads()} B={ps.B}", flush=True)
    for name in names:
        run(name, 0, args.warmup)
    rates = {n: [] for n in names}
    k = args.warmup
    for r in range(args.runs):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(run(name, k, args.steps))
        k += args.steps
        print(f"  run {r + 1}: " + "  ".join(f"{n} {rates[n][-1] * ps.B:,.0f}" for n in names), flush=True)
    for n in names:
        print(f"  {n:28s} median {statistics.median(rates[n]) * ps.B:>10,.0f} samples/s")
    peers = [n for n in names if park[n] is None]
    for n in names:
        if park[n] is None:
            continue
        for p in peers + ([n + "_spin"] if park[n] else []):
            ratio = statistics.median(a / b for a, b in zip(rates[n], rates[p], strict=True))
            print(f"  {n}/{p}: {ratio:.3f}")


if __name__ == "__main__":
    main()
