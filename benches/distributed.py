"""Row-wise sharded DeepFM on one machine: two torchrun ranks of one thread
each, batch B per rank, against one process of two threads with batch 2B —
the same samples and the same model (26 sparse fields of 1-3 ids, Zipf over
``--vocab`` ids a field, 13 dense, dim 16, MLP 400-400-400), in one run.
Prints samples/s of both and their ratio: what the exchange with the ids'
owners costs when the ranks share one machine's cores.

    .venv/bin/python benches/distributed.py            # B = 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from recis import distributed
from recis.models import DeepFM
from recis.optim import SparseAdam
from recis.ragged import batch_rows
from recis.synthetic import SyntheticCTR


def worker(args) -> None:
    distributed.init_from_env()
    rank, n = distributed.rank(), distributed.world()
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=args.vocab, min_ids=1, max_ids=3)
    rng = np.random.default_rng(0)
    per = 2 * args.batch_size // n
    batches = []
    for _ in range(args.warmup + args.steps):
        feats, dense, labels = data.batch(2 * args.batch_size, rng)
        batches.append(batch_rows({**feats, "dense": dense, "label": labels}, rank * per, (rank + 1) * per))
    torch.manual_seed(0)
    model = DeepFM(data.feature_names(), num_dense=13, dim=16, hidden=(400, 400, 400))
    distributed.broadcast_dense(model)
    sparse, dense = SparseAdam(model, lr=1e-3), torch.optim.Adam(model.parameters(), lr=1e-3)
    for i, b in enumerate(batches):
        if i == args.warmup:
            distributed.barrier()
            t0 = time.perf_counter()
        F.binary_cross_entropy_with_logits(model(b), b["label"]).backward()
        distributed.average_dense_gradients(model.parameters())
        sparse.step()
        sparse.zero_grad()
        dense.step()
        dense.zero_grad()
    distributed.barrier()
    rate = args.steps * 2 * args.batch_size / (time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"world": n, "threads": torch.get_num_threads(), "samples_per_s": rate}))


def run(cmd, env) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=2048, help="per rank (one process: twice this)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    me = [os.path.abspath(__file__), "--worker", "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    me += ["--warmup", str(args.warmup), "--vocab", str(args.vocab)]
    one, two = [], []
    for r in range(args.rounds):
        env = dict(os.environ, OMP_NUM_THREADS="2")
        one.append(run([sys.executable, *me], env)["samples_per_s"])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        two.append(
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *me], env)[
                "samples_per_s"
            ]
        )
        print(f"round {r + 1}: one process (2 threads) {one[-1]:,.0f}  two ranks (1 thread each) {two[-1]:,.0f}")
    a, b = float(np.median(one)), float(np.median(two))
    print(
        f"\nDeepFM, {2 * args.batch_size} samples a step, median of {args.rounds} rounds, samples/s:\n"
        f"  one process, 2 threads:      {a:10,.0f}\n  two ranks, 1 thread each:    {b:10,.0f}\n"
        f"  two ranks / one process:     {b / a:.2f}x"
    )


if __name__ == "__main__":
    main()
