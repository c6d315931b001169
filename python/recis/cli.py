"""The ``recis`` command.

``recis demo``: the main job until the Trainer lands — trains a model of
dynamic embeddings and an MLP on synthetic CTR data with a hidden click model,
printing the loss as it falls, held-out AUC (with the AUC of the true click
probabilities as the ceiling) and samples/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import recis
from recis.metrics import auc, log_loss
from recis.nn import DynamicEmbedding, EmbeddingOption, NormalInit
from recis.optim import SparseAdam
from recis.synthetic import SyntheticCTR


class DemoModel(nn.Module):
    """All sparse features share one dynamic table (ids are distinct per
    feature), pooled per feature, then an MLP."""

    def __init__(self, names, dim, hidden=(256, 128)):
        super().__init__()
        self.names = list(names)
        self.embedding = DynamicEmbedding(EmbeddingOption(dim=dim, initializer=NormalInit(0, 0.01)), "sparse")
        layers, width = [], dim * len(self.names)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features):
        pooled = self.embedding(features)
        return self.mlp(torch.cat([pooled[n] for n in self.names], dim=1)).squeeze(1)


def demo(args) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = SyntheticCTR(num_features=args.features, vocab=args.vocab, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    eval_batches = [data.batch(args.batch_size, rng) for _ in range(args.eval_batches)]
    model = DemoModel(data.feature_names(), args.dim)
    sparse_opt = SparseAdam(model, lr=args.lr)
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=args.lr)
    print(
        f"recis {recis.__version__}: {args.features} sparse features, Zipf({data.zipf_s}) over "
        f"{args.vocab:,} ids each, dim {args.dim}, batch {args.batch_size}, {args.steps} steps, "
        f"{args.threads} threads"
    )
    model.train()
    window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
    for step in range(1, args.steps + 1):
        feats, _, labels = data.batch(args.batch_size, rng)
        loss = F.binary_cross_entropy_with_logits(model(feats), labels)
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        window.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            rate = len(window) * args.batch_size / (now - t_window)
            print(
                f"step {step:5d}  loss {np.mean(window):.4f}  ids {len(model.embedding.table):,}  {rate:,.0f} samples/s"
            )
            window, t_window = [], now
    train_time = time.perf_counter() - t_start
    model.eval()
    ys, ps = [], []
    with torch.no_grad():
        for feats, _, labels in eval_batches:
            ps.append(torch.sigmoid(model(feats)).numpy())
            ys.append(labels.numpy())
    y, p = np.concatenate(ys), np.concatenate(ps)
    stats = model.embedding.table.stats()
    print(
        f"eval: AUC {auc(y, p):.4f}  log loss {log_loss(y, p):.4f}  CTR {y.mean():.4f}  "
        f"mean prediction {p.mean():.4f}  ({y.size:,} held-out samples)"
    )
    print(
        f"train: {args.steps * args.batch_size / train_time:,.0f} samples/s overall; table holds "
        f"{stats['len']:,} ids in {stats['total_bytes'] / 2**20:.1f} MiB"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"recis {recis.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train on synthetic CTR data; print loss, AUC and samples/s")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--batch-size", type=int, default=4096)
    d.add_argument("--features", type=int, default=8)
    d.add_argument("--vocab", type=int, default=1_000_000)
    d.add_argument("--dim", type=int, default=16)
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--eval-batches", type=int, default=10)
    d.add_argument("--log-every", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    c = sub.add_parser("convert", help="CSV/TSV (Criteo, Avazu or any schema) or Parquet to ORC files")
    c.add_argument("inputs", nargs="+", help="input files, converted in order")
    c.add_argument("--output", "-o", required=True, help="output directory for part-NNNNN.orc")
    c.add_argument("--format", required=True, choices=["criteo", "avazu", "csv", "tsv", "parquet"])
    c.add_argument("--rows-per-file", type=int, default=1_000_000)
    c.add_argument("--compression", default="zstd", choices=["uncompressed", "zlib", "snappy", "lz4", "zstd"])
    c.add_argument("--no-header", action="store_true", help="the CSV has no header line (avazu dev/test)")
    c.add_argument("--no-label", action="store_true", help="the file has no label column (criteo/avazu test)")
    c.add_argument("--schema", help="csv/tsv column types: name:type,... (int64, float32, float64, string, bool)")
    c.set_defaults(func=convert_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


def convert_cmd(args) -> int:
    from recis.io.convert import ConvertError, convert

    try:
        files = convert(
            args.inputs,
            args.output,
            args.format,
            rows_per_file=args.rows_per_file,
            compression=args.compression,
            header=not args.no_header,
            label=not args.no_label,
            schema=args.schema,
        )
    except ConvertError as e:
        print(f"recis convert: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
