"""DeepFM: RecIS against a plain-PyTorch DeepFM with fixed-size hashed
embeddings, in one run.

``--mode speed``: the standard DeepFM shape (26 sparse fields of 1-3 ids, 13
dense, dim 16, MLP 400-400-400, batch 4096, 2 threads) — samples/s of RecIS,
of the plain-PyTorch baseline (``nn.EmbeddingBag(sparse=True)`` per field,
ids mod ``--hash-size``, ``SparseAdam`` + ``Adam``), and of the dense-only
ceiling: the same MLP's forward, backward and Adam step on a ready
[4096, 429] input. It also times DeepFM's own dense part (first-order, FM and
MLP terms, forward, backward and Adam) on ready pooled rows that require
grad: the most RecIS could reach with a free sparse side; the share of a
RecIS step beyond it is what the sparse side costs.

``--mode quality``: held-out AUC on the real Avazu and Criteo slices in
``../shared/data`` (fixed 80/20 split, several seeds, same features, dims and
epochs); each categorical value becomes the id ``fingerprint64("field=value")``
(the baseline takes it mod ``--hash-size``).

    .venv/bin/python benches/deepfm.py --mode speed
    .venv/bin/python benches/deepfm.py --mode quality
    .venv/bin/python benches/deepfm.py --mode phases    # where a RecIS step's time goes
    .venv/bin/python benches/deepfm.py --mode ab --steps 20 --warmup 10   # Rust pooling / one-call lookup A/B
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pyarrow.csv as pcsv
import torch
import torch.nn.functional as F
from torch import nn

from recis import RaggedTensor, _native
from recis.metrics import auc
from recis.models import DeepFM
from recis.nn import EmbeddingEngine
from recis.optim import SparseAdam
from recis.synthetic import SyntheticCTR

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


class PlainDeepFM(nn.Module):
    """DeepFM with one fixed-size ``nn.EmbeddingBag`` per field (ids mod hash_size)."""

    def __init__(self, fields, num_dense, dim, hidden, hash_size):
        super().__init__()
        self.fields, self.hash_size = list(fields), hash_size
        self.emb = nn.ModuleList(nn.EmbeddingBag(hash_size, dim, mode="sum", sparse=True) for _ in fields)
        self.first = nn.ModuleList(nn.EmbeddingBag(hash_size, 1, mode="sum", sparse=True) for _ in fields)
        for e in self.emb:
            nn.init.normal_(e.weight, 0, 0.01)
        for e in self.first:
            nn.init.normal_(e.weight, 0, 0.0001)
        self.num_dense = num_dense
        self.dense_linear = nn.Linear(num_dense, 1) if num_dense else None
        layers, width = [], dim * len(self.fields) + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def sparse_parameters(self):
        return [*self.emb.parameters(), *self.first.parameters()]

    def dense_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith(("emb.", "first."))]

    def forward(self, batch):
        vs, firsts = [], []
        for f, e, e1 in zip(self.fields, self.emb, self.first, strict=True):
            rt = batch[f]
            ids = torch.remainder(rt.values, self.hash_size)
            vs.append(e(ids, rt.offsets[:-1]))
            firsts.append(e1(ids, rt.offsets[:-1]))
        v = torch.stack(vs, 1)
        logit = torch.stack(firsts, 1).sum((1, 2)) + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        deep_in = v.flatten(1)
        if self.num_dense:
            logit = logit + self.dense_linear(batch["dense"]).squeeze(1)
            deep_in = torch.cat([deep_in, batch["dense"]], 1)
        return logit + self.mlp(deep_in).squeeze(1)


def make_pair(fields, num_dense, dim, hidden, hash_size, lr, seed, coalesce=True):
    torch.manual_seed(seed)
    ours = DeepFM(fields, num_dense=num_dense, dim=dim, hidden=hidden, seed=seed)
    if not coalesce:  # a physical table per field, looked up in the same one native call
        ours.embedding = EmbeddingEngine(ours.embedding.options, coalesce=False)
    ours_opts = [SparseAdam(ours, lr=lr), torch.optim.Adam(ours.parameters(), lr=lr)]
    torch.manual_seed(seed)
    plain = PlainDeepFM(fields, num_dense, dim, hidden, hash_size)
    plain_opts = [
        torch.optim.SparseAdam(plain.sparse_parameters(), lr=lr),
        torch.optim.Adam(plain.dense_parameters(), lr=lr),
    ]
    return (ours, ours_opts), (plain, plain_opts)


def step(model, opts, batch):
    loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
    loss.backward()
    for o in opts:
        o.step()
        o.zero_grad()
    return float(loss.detach())


def speed(args):
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=args.vocab, min_ids=1, max_ids=3)
    rng = np.random.default_rng(0)
    fields = data.feature_names()
    batches = []
    for _ in range(args.warmup + args.steps):
        feats, dense, labels = data.batch(args.batch_size, rng)
        batches.append({**feats, "dense": dense, "label": labels})
    hidden = (400, 400, 400)
    rates = {
        "recis": [],
        "recis, table per field": [],
        "plain torch": [],
        "dense-only ceiling": [],
        "deepfm dense part": [],
    }
    for r in range(args.rounds):
        (ours, oo), (plain, po) = make_pair(fields, 13, 16, hidden, args.hash_size, 1e-3, r)
        (apart, ao), _ = make_pair(fields, 13, 16, hidden, args.hash_size, 1e-3, r, coalesce=False)
        contenders = (("recis", (ours, oo)), ("recis, table per field", (apart, ao)), ("plain torch", (plain, po)))
        for name, (m, opts) in contenders:
            for b in batches[: args.warmup]:
                step(m, opts, b)
            t0 = time.perf_counter()
            for b in batches[args.warmup :]:
                step(m, opts, b)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        with torch.no_grad():
            ours.eval()
            ready = [ours.lookup(b).detach() for b in batches[: args.warmup + args.steps]]
        del ours, plain, oo, po, apart, ao, contenders
        torch.manual_seed(r)
        layers, width = [], 26 * 16 + 13
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        x = torch.randn(args.batch_size, 26 * 16 + 13)
        y = batches[0]["label"]
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                t0 = time.perf_counter()
            F.binary_cross_entropy_with_logits(mlp(x).squeeze(1), y).backward()
            opt.step()
            opt.zero_grad()
        rates["dense-only ceiling"].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        # DeepFM's own dense work: its first-order, FM and MLP terms on the
        # rows RecIS pooled (ready, requiring grad, as the sparse side gets
        # them), forward, backward and Adam. No table, no lookup.
        torch.manual_seed(r)
        fm = DeepFM(fields, num_dense=13, dim=16, hidden=hidden, seed=r)
        fopt = torch.optim.Adam(fm.parameters(), lr=1e-3)
        for i, (rows, b) in enumerate(zip(ready, batches, strict=True)):
            if i == args.warmup:
                t0 = time.perf_counter()
            rows.requires_grad_(True)
            F.binary_cross_entropy_with_logits(fm.logits(rows, b), b["label"]).backward()
            fopt.step()
            fopt.zero_grad()
        rates["deepfm dense part"].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        del ready, fm, fopt
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"\nDeepFM, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} rounds "
        f"({args.warmup} warm-up + {args.steps} timed steps each), samples/s:"
    )
    for k, v in med.items():
        print(f"  {k:20s} {v:>10,.0f}")
    print(f"  recis / plain torch:        {med['recis'] / med['plain torch']:.2f}x")
    print(f"  recis / table per field:    {med['recis'] / med['recis, table per field']:.2f}x")
    print(f"  recis / dense-only ceiling: {med['recis'] / med['dense-only ceiling']:.2f}x")
    print(f"  deepfm dense part / ceiling: {med['deepfm dense part'] / med['dense-only ceiling']:.2f}x")
    print(f"  recis / deepfm dense part:  {med['recis'] / med['deepfm dense part']:.2f}x")
    # Share of a RecIS step that is not DeepFM's dense work: the sparse side.
    print(f"  sparse side's share of a RecIS step: {1 - med['recis'] / med['deepfm dense part']:.0%}")


def phases(args):
    """Where a RecIS DeepFM step spends its time."""
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=args.vocab, min_ids=1, max_ids=3)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        feats, dense, labels = data.batch(args.batch_size, rng)
        batches.append({**feats, "dense": dense, "label": labels})
    torch.manual_seed(0)
    m = DeepFM(data.feature_names(), num_dense=13, dim=16, hidden=(400, 400, 400))
    if args.table_per_field:
        m.embedding = EmbeddingEngine(m.embedding.options, coalesce=False)
    sparse, dense_opt = SparseAdam(m, lr=1e-3), torch.optim.Adam(m.parameters(), lr=1e-3)
    spent: dict[str, float] = {}

    def lap(name, t0):
        now = time.perf_counter()
        spent[name] = spent.get(name, 0.0) + now - t0
        return now

    for i, b in enumerate(batches):
        if i == args.warmup:
            spent.clear()
        t = time.perf_counter()
        rows = m.lookup(b)
        t = lap("embedding forward (dedup, lookup/insert, gather, pool)", t)
        logit = m.logits(rows, b)
        t = lap("FM + MLP forward", t)
        F.binary_cross_entropy_with_logits(logit, b["label"]).backward()
        t = lap("backward (MLP + sparse pooling)", t)
        sparse.step()
        sparse.zero_grad()
        t = lap("sparse Adam step", t)
        dense_opt.step()
        dense_opt.zero_grad()
        lap("dense Adam step", t)
    total = sum(spent.values())
    for k, v in spent.items():
        print(f"  {k:55s} {v / args.steps * 1e3:7.1f} ms")
    print(
        f"  {'total':55s} {total / args.steps * 1e3:7.1f} ms -> {args.batch_size * args.steps / total:,.0f} samples/s"
    )


def ab(args):
    """Rust pooling against what it replaced, in one process: two identical
    DeepFMs step alternately on the same batches, one with the baseline
    swapped into the engine module for its steps. Pooling: Rust,
    sample-major ``[B, F, D]`` with a dense gradient, against torch's
    ``embedding_bag`` (sparse gradient) and a stack; the full step. (The
    per-table-gather baseline of the one-call lookup is gone: the lookup and
    gather are one locked pipeline call in the core now.)"""
    import recis.nn.engine as engine

    data = SyntheticCTR(num_features=26, num_dense=13, vocab=args.vocab, min_ids=1, max_ids=3)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        feats, dense, labels = data.batch(args.batch_size, rng)
        batches.append({**feats, "dense": dense, "label": labels})
    rust_pool = engine.pool_stacked
    cases = {
        "pooling": {"embedding_bag + stack": lambda *a: None, "rust, [B, F, D]": rust_pool},
    }
    for case, variants in cases.items():
        models = {}
        for name in variants:
            torch.manual_seed(0)
            m = DeepFM(data.feature_names(), num_dense=13, dim=16, hidden=(400, 400, 400))
            models[name] = (m, SparseAdam(m, lr=1e-3), torch.optim.Adam(m.parameters(), lr=1e-3))
        spent = {name: [] for name in variants}
        try:
            for i, b in enumerate(batches):
                for name, pool_fn in variants.items():
                    engine.pool_stacked = pool_fn
                    m, sparse, dense = models[name]
                    t0 = time.perf_counter()
                    F.binary_cross_entropy_with_logits(m(b), b["label"]).backward()
                    for o in (sparse, dense):
                        o.step()
                        o.zero_grad()
                    t = time.perf_counter() - t0
                    if i >= args.warmup:
                        spent[name].append(t)
        finally:
            engine.pool_stacked = rust_pool
        params = [list(m.parameters()) for m, _, _ in models.values()]
        same = all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(*params, strict=True))
        print(f"{case}: median training step over {args.steps} steps (dense parameters agree: {same})")
        for name, v in spent.items():
            print(f"  {name:32s} {statistics.median(v) * 1e3:7.1f} ms")


def categorical(table, fields):
    """{field: RaggedTensor of one id a row}: fingerprint64("field=value")."""
    out = {}
    n = table.num_rows
    offsets = torch.arange(n + 1, dtype=torch.int64)
    for f in fields:
        vals = table.column(f).to_pylist()
        ids = [_native.fingerprint64(f"{f}={v}".encode()) for v in vals]
        out[f] = RaggedTensor(torch.tensor([i - 2**64 if i >= 2**63 else i for i in ids]), offsets, validate=False)
    return out


def load_real(name):
    if name == "avazu":
        path = os.path.join(SHARED, "avazu", "avazu_train.csv")
        t = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={"id": "string"}))
        label = np.asarray(t.column("click").to_pylist(), dtype=np.float32)
        fields = [c for c in t.column_names if c not in ("id", "click")]
        return categorical(t, fields), None, label, fields
    path = os.path.join(SHARED, "criteo", "criteo_kaggle_head_train.txt")
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    t = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=names),
        parse_options=pcsv.ParseOptions(delimiter="\t"),
        convert_options=pcsv.ConvertOptions(column_types={n: "string" for n in names[14:]}),
    )
    label = np.asarray(t.column("label").to_pylist(), dtype=np.float32)
    dense = np.stack(
        [np.nan_to_num(np.asarray(t.column(f"I{i}").to_pylist(), dtype=np.float64), nan=0.0) for i in range(1, 14)], 1
    )
    dense = torch.from_numpy(np.log1p(np.maximum(dense, 0)).astype(np.float32))
    fields = names[14:]
    return categorical(t, fields), dense, label, fields


def take(feats, dense, label, idx):
    b = {
        f: RaggedTensor(rt.values[idx], torch.arange(len(idx) + 1, dtype=torch.int64), validate=False)
        for f, rt in feats.items()
    }
    if dense is not None:
        b["dense"] = dense[idx]
    b["label"] = torch.from_numpy(label[idx])
    return b


def quality(args):
    if not os.path.isdir(SHARED):
        print(f"{SHARED} not present: the real-data comparison needs ../shared/data")
        return
    print(
        f"held-out AUC, 80/20 split, DeepFM dim 16, MLP {args.quality_hidden}, {args.epochs} epochs, "
        f"batch {args.quality_batch}, plain torch hash size {args.hash_size:,}"
    )
    hidden = tuple(int(x) for x in args.quality_hidden.split("-"))
    for name in ("avazu", "criteo"):
        feats, dense, label, fields = load_real(name)
        n = len(label)
        split = np.random.default_rng(0).permutation(n)
        train_idx, test_idx = split[: int(0.8 * n)], split[int(0.8 * n) :]
        test = take(feats, dense, label, test_idx)
        res = {"recis": [], "plain torch": []}
        for seed in range(args.seeds):
            (ours, oo), (plain, po) = make_pair(
                fields, 0 if dense is None else 13, 16, hidden, args.hash_size, args.quality_lr, seed
            )
            order_rng = np.random.default_rng(seed)
            for _ in range(args.epochs):
                order = order_rng.permutation(train_idx)
                for k in range(0, len(order), args.quality_batch):
                    b = take(feats, dense, label, order[k : k + args.quality_batch])
                    step(ours, oo, b)
                    step(plain, po, b)
            ours.eval()
            plain.eval()
            with torch.no_grad():
                res["recis"].append(auc(test["label"].numpy(), torch.sigmoid(ours(test)).numpy()))
                res["plain torch"].append(auc(test["label"].numpy(), torch.sigmoid(plain(test)).numpy()))
        print(
            f"  {name:7s} ({n:,} rows, {len(test_idx):,} held out): "
            + "  ".join(f"{k} {np.mean(v):.4f} ± {np.std(v):.4f}" for k, v in res.items())
            + f"   (seeds: {args.seeds})"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["speed", "quality", "phases", "ab"], default="speed")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--hash-size", type=int, default=1 << 20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-per-field", action="store_true", help="phases: a physical table per field")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quality-batch", type=int, default=256)
    ap.add_argument("--quality-lr", type=float, default=1e-3)
    ap.add_argument("--quality-hidden", default="400-400-400")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"speed": speed, "quality": quality, "phases": phases, "ab": ab}[args.mode](args)


if __name__ == "__main__":
    main()
