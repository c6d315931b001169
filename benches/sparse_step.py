"""Sparse training step: RecIS against plain PyTorch and TorchRec, in one run.

A step is lookup + pooling + a small dense head + backward + sparse optimizer
step (+ dense SGD step). Standard workload: 8 sparse features, batch 4096,
1-3 ids per feature per sample, ids Zipf(1.05) over a 10M vocabulary scrambled
to 63-bit ids, dim 16, 2 threads.

Contenders (same batches, same head, same order):
- recis-adam / recis-rowwise: one DynamicEmbedding table shared by the 8
  features (one lookup a step), SparseAdam / SparseRowWiseAdagrad. Raw 63-bit
  ids, no collisions, the table grows as new ids arrive.
- torch: 8 x nn.EmbeddingBag(hash_size, sparse=True) + torch.optim.SparseAdam,
  ids mod hash_size.
- torchrec: FusedEmbeddingBagCollection (FBGEMM CPU kernels, row-wise Adagrad
  fused into backward), 8 tables of hash_size rows, ids mod hash_size.

Input preparation (mod, KeyedJaggedTensor) is done before timing; RecIS needs
none. Each contender runs `--warmup` untimed steps then `--steps` timed ones,
with fresh tables each round; the median round is reported.

    .venv/bin/python benches/sparse_step.py            # make bench-peers first for torchrec
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recis.nn import DynamicEmbedding, EmbeddingOption, UniformInit
from recis.optim import SparseAdam, SparseRowWiseAdagrad
from recis.synthetic import SyntheticCTR


def head(num_features: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(num_features * dim, 64), nn.ReLU(), nn.Linear(64, 1))


class RecisContender:
    def __init__(self, names, dim, optimizer):
        self.names = names
        self.emb = DynamicEmbedding(
            EmbeddingOption(dim=dim, initializer=UniformInit(-0.01, 0.01), initial_capacity=1 << 20), "shared"
        )
        self.head = head(len(names), dim)
        self.sparse = optimizer(self.emb, lr=0.01)
        self.dense = torch.optim.SGD(self.head.parameters(), lr=0.01)

    def prepare(self, feats):
        return feats

    def step(self, feats, labels):
        pooled = self.emb(feats)
        logits = self.head(torch.cat([pooled[n] for n in self.names], 1)).squeeze(1)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        self.sparse.step()
        self.dense.step()
        self.sparse.zero_grad()
        self.dense.zero_grad()

    def bytes_per_id(self):
        s = self.emb.table.stats()
        width = self.emb.table.dim + self.emb.table.native.slot_width
        return s["len"], width * 4, s["overhead_bytes_per_id"]


class TorchContender:
    def __init__(self, names, dim, hash_size):
        self.names, self.hash_size = names, hash_size
        self.bags = nn.ModuleList(nn.EmbeddingBag(hash_size, dim, mode="sum", sparse=True) for _ in names)
        for b in self.bags:
            nn.init.uniform_(b.weight, -0.01, 0.01)
        self.head = head(len(names), dim)
        self.sparse = torch.optim.SparseAdam(self.bags.parameters(), lr=0.01)
        self.dense = torch.optim.SGD(self.head.parameters(), lr=0.01)

    def prepare(self, feats):
        return [(feats[n].values % self.hash_size, feats[n].offsets[:-1]) for n in self.names]

    def step(self, prepared, labels):
        pooled = [bag(v, o) for bag, (v, o) in zip(self.bags, prepared, strict=True)]
        logits = self.head(torch.cat(pooled, 1)).squeeze(1)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        self.sparse.step()
        self.dense.step()
        self.sparse.zero_grad()
        self.dense.zero_grad()


class TorchRecContender:
    def __init__(self, names, dim, hash_size):
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        self.names, self.hash_size = names, hash_size
        tables = [
            EmbeddingBagConfig(name=f"t_{n}", embedding_dim=dim, num_embeddings=hash_size, feature_names=[n])
            for n in names
        ]
        self.ebc = FusedEmbeddingBagCollection(
            tables=tables, optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": 0.01}, device=torch.device("cpu")
        )
        self.head = head(len(names), dim)
        self.dense = torch.optim.SGD(self.head.parameters(), lr=0.01)

    def prepare(self, feats):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        values = torch.cat([feats[n].values % self.hash_size for n in self.names])
        lengths = torch.cat([feats[n].lengths() for n in self.names])
        return KeyedJaggedTensor(keys=self.names, values=values, lengths=lengths)

    def step(self, kjt, labels):
        logits = self.head(self.ebc(kjt).values()).squeeze(1)
        F.binary_cross_entropy_with_logits(logits, labels).backward()  # fused sparse update here
        self.dense.step()
        self.dense.zero_grad()


def run(contender, batches, warmup: int) -> float:
    prepared = [(contender.prepare(f), y) for f, y in batches]
    for x, y in prepared[:warmup]:
        contender.step(x, y)
    t0 = time.perf_counter()
    for x, y in prepared[warmup:]:
        contender.step(x, y)
    elapsed = time.perf_counter() - t0
    return (len(prepared) - warmup) * batches[0][1].numel() / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hash-size", type=int, default=1 << 21, help="rows per table of the fixed-size peers")
    ap.add_argument("--contenders", default="recis-adam,recis-rowwise,torch,torchrec")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = SyntheticCTR(num_features=args.features, vocab=args.vocab, zipf_s=1.05, min_ids=1, max_ids=3)
    rng = np.random.default_rng(0)
    batches = [(lambda f, _d, y: (f, y))(*data.batch(args.batch_size, rng)) for _ in range(args.warmup + args.steps)]
    names = data.feature_names()
    makers = {
        "recis-adam": lambda: RecisContender(names, args.dim, SparseAdam),
        "recis-rowwise": lambda: RecisContender(names, args.dim, SparseRowWiseAdagrad),
        "torch": lambda: TorchContender(names, args.dim, args.hash_size),
        "torchrec": lambda: TorchRecContender(names, args.dim, args.hash_size),
    }
    chosen = [c for c in args.contenders.split(",") if c]
    if "torchrec" in chosen:
        try:
            import torchrec  # noqa: F401
        except ImportError as e:
            print(f"torchrec not available ({e}); run `make bench-peers`. Skipping it.")
            chosen.remove("torchrec")

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}"
    )
    print(
        f"workload: {args.features} features x 1-3 ids, batch {args.batch_size}, Zipf(1.05) over "
        f"{args.vocab:,} ids, dim {args.dim}; {args.warmup} warm-up + {args.steps} timed steps, "
        f"{args.rounds} rounds; fixed-size peers: {args.hash_size:,} rows per table"
    )
    rates: dict[str, list[float]] = {c: [] for c in chosen}
    memory = None
    for r in range(args.rounds):
        for c in chosen:
            model = makers[c]()
            rates[c].append(run(model, batches, args.warmup))
            if c.startswith("recis") and memory is None:
                memory = model.bytes_per_id()
            del model
            gc.collect()
        print(f"round {r + 1}: " + "  ".join(f"{c} {rates[c][-1]:,.0f}" for c in chosen))
    med = {c: statistics.median(v) for c, v in rates.items()}
    print("\nsamples/s (median of rounds):")
    for c in chosen:
        print(f"  {c:14s} {med[c]:>10,.0f}")
    for ours, peer in (("recis-adam", "torch"), ("recis-rowwise", "torchrec"), ("recis-adam", "torchrec")):
        if ours in med and peer in med:
            print(f"  ratio {ours} / {peer}: {med[ours] / med[peer]:.2f}x")
    if memory:
        n, row, overhead = memory
        print(
            f"\nRecIS table after a run: {n:,} ids; row {row} bytes (embedding + Adam slots); "
            f"overhead {overhead:.1f} bytes per id (id map + metadata + sketch/free list)"
        )


if __name__ == "__main__":
    main()
