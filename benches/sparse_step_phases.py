"""Where a RecIS sparse step spends its time: each phase of the step of
``sparse_step.py`` (RecIS, SparseAdam, one shared table) timed on its own.

    .venv/bin/python benches/sparse_step_phases.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from recis import _native
from recis.nn import DynamicEmbedding, EmbeddingOption, UniformInit
from recis.nn.dynamic_embedding import concat_ragged, pool
from recis.optim import SparseAdam
from recis.synthetic import SyntheticCTR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = SyntheticCTR(num_features=8, vocab=10_000_000)
    rng = np.random.default_rng(0)
    batches = [data.batch(args.batch_size, rng) for _ in range(args.warmup + args.steps)]
    names = data.feature_names()
    emb = DynamicEmbedding(EmbeddingOption(dim=16, initializer=UniformInit(-0.01, 0.01), initial_capacity=1 << 20))
    head = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = SparseAdam(emb, lr=0.01)
    dense = torch.optim.SGD(head.parameters(), lr=0.01)
    kernel = opt._kernel(opt.param_groups[0])
    spent: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        spent[name] = spent.get(name, 0.0) + now - t0
        return now

    u = inverse = None
    for i, (feats, _, labels) in enumerate(batches):
        if i == args.warmup:
            spent.clear()
        t = time.perf_counter()
        rt = concat_ragged([feats[n] for n in names])
        t = lap("concat features", t)
        block, inverse, _rows, _sizes, runs = _native.lookup_gather_many(
            [emb.table.native], [rt.values.numpy()], [i], [True], [0], [True]
        )
        w = torch.from_numpy(block)
        t = lap("dedup + lookup/insert + gather", t)
        w.requires_grad_(True)
        emb.table.add_pending(runs[0][2], w)
        out = pool(w, torch.from_numpy(inverse), rt.offsets, None, "sum")
        t = lap("pool forward", t)
        pooled = dict(zip(names, out.split(args.batch_size), strict=True))
        logits = head(torch.cat([pooled[n] for n in names], 1)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        t = lap("dense head forward", t)
        loss.backward()
        t = lap("backward", t)
        r, ix, g = emb.table.pending_gradients()
        _native.apply_gradients_many([emb.table.native], [r], [ix], [g], kernel, 0.01, [i + 1])
        emb.table.clear_pending()
        t = lap("sparse Adam apply", t)
        dense.step()
        dense.zero_grad()
        lap("dense optimizer", t)
    total = sum(spent.values())
    for k, v in spent.items():
        print(f"{k:24s} {v / args.steps * 1e3:7.2f} ms")
    print(f"{'total':24s} {total / args.steps * 1e3:7.2f} ms -> {args.batch_size * args.steps / total:,.0f} samples/s")
    print(f"last batch: {len(inverse):,} ids, {len(u):,} distinct; table holds {len(emb.table):,} ids")


if __name__ == "__main__":
    main()
