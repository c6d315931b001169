"""Test AUC on the Avazu slice: RecIS's job (examples/avazu.toml: DeepFM,
defaults, a validation split, early stopping) against a plain-PyTorch
DeepFM with the same split, features, dims, optimizers, batch size and
early stopping, over several seeds.

    python benches/avazu_quality.py [--shared ../shared/data] [--seeds 0 1 2]

The split: avazu_train.csv trains, avazu_dev.csv validates (each epoch;
patience 2; the best epoch's model is tested), avazu_test.csv tests. The
baseline is what a PyTorch user writes: a vocabulary per field built from
the training file (an unseen value is index 0), ``nn.Embedding`` tables for
the factors and the first-order weights, initialised as RecIS's
(Normal(0, 0.01)), the MLP 400-400-400, ``torch.optim.SparseAdam`` for the
embeddings and ``Adam`` for the rest (lr 1e-3 both, as the job), the rows
shuffled each epoch. Nothing is tuned to the slice: both use the job's
settings. AUCs are sklearn's ``roc_auc_score``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.orc as po
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = (
    ["site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id"]
    + ["device_ip", "device_model", "hour", "C1", "banner_pos", "device_type", "device_conn_type"]
    + [f"C{i}" for i in range(14, 22)]
)
DIM, HIDDEN, BATCH, LR, PATIENCE, MAX_EPOCHS = 16, (400, 400, 400), 256, 1e-3, 2, 20


def convert(shared: str, out: str) -> dict:
    recis = [sys.executable, "-m", "recis"]
    src = os.path.join(shared, "avazu")
    dirs = {}
    for split, name, header in [("train", "avazu_train.csv", []), ("valid", "avazu_dev.csv", ["--no-header"])]:
        dirs[split] = os.path.join(out, split)
        cmd = [*recis, "convert", "--format", "avazu", *header, os.path.join(src, name), "-o", dirs[split]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    dirs["test"] = os.path.join(out, "test")
    subprocess.run(
        [
            *recis,
            "convert",
            "--format",
            "avazu",
            "--no-header",
            os.path.join(src, "avazu_test.csv"),
            "-o",
            dirs["test"],
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return dirs


def recis_run(dirs: dict, seed: int, out: str) -> tuple[float, int]:
    """(test AUC of the best checkpoint, its step), the job as examples/avazu.toml."""
    from recis.config import Job, load_config

    with open(os.path.join(ROOT, "examples", "avazu.toml")) as f:
        text = f.read()
    path = os.path.join(out, f"avazu-{seed}.toml")
    with open(path, "w") as f:
        f.write(text)
    sets = [
        f'data.train=["{dirs["train"]}"]',
        f'data.valid=["{dirs["valid"]}"]',
        f'data.eval=["{dirs["test"]}"]',
        f"data.seed={seed}",
        f'trainer.output_dir="{os.path.join(out, f"recis-{seed}")}"',
        "trainer.log_every_steps=1000",
    ]
    job = Job(load_config(path, sets))
    logs = job.trainer.train()
    return logs["eval"]["auc"], logs["best"]["step"]


class PlainDeepFM(nn.Module):
    def __init__(self, vocab_sizes: list[int]):
        super().__init__()
        self.factors = nn.ModuleList(nn.Embedding(v, DIM, sparse=True) for v in vocab_sizes)
        self.first = nn.ModuleList(nn.Embedding(v, 1, sparse=True) for v in vocab_sizes)
        for e in [*self.factors, *self.first]:
            nn.init.normal_(e.weight, 0.0, 0.01)
        layers, width = [], DIM * len(vocab_sizes)
        for h in HIDDEN:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.stack([e(x[:, k]) for k, e in enumerate(self.factors)], 1)  # [B, F, D]
        first = torch.cat([e(x[:, k]) for k, e in enumerate(self.first)], 1).sum(1)
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        return first + fm + self.mlp(v.flatten(1)).squeeze(1)


def load(dirs: dict):
    tables = {s: po.read_table(os.path.join(d, "part-00000.orc")) for s, d in dirs.items()}
    vocabs = [{v: i + 1 for i, v in enumerate(dict.fromkeys(tables["train"][f].to_pylist()))} for f in FIELDS]
    data = {}
    for s, t in tables.items():
        x = np.stack([[vocab.get(v, 0) for v in t[f].to_pylist()] for f, vocab in zip(FIELDS, vocabs, strict=True)], 1)
        data[s] = (torch.from_numpy(x.astype(np.int64)), torch.tensor(t["click"].to_pylist(), dtype=torch.float32))
    return data, [len(v) + 1 for v in vocabs]


def auc_of(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(torch.cat([model(x[i : i + 4096]) for i in range(0, len(x), 4096)]))
    model.train()
    return float(roc_auc_score(y.numpy(), p.numpy()))


def baseline_run(data, vocab_sizes, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = PlainDeepFM(vocab_sizes)
    emb = [p for n, p in model.named_parameters() if n.startswith(("factors", "first"))]
    rest = [p for n, p in model.named_parameters() if n.startswith("mlp")]
    opts = [torch.optim.SparseAdam(emb, lr=LR), torch.optim.Adam(rest, lr=LR)]
    x, y = data["train"]
    g = torch.Generator().manual_seed(seed)
    best, best_state, bad, step, best_step = -1.0, None, 0, 0, 0
    for _ in range(MAX_EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            step += 1
        auc = auc_of(model, *data["valid"])
        if auc > best:
            best, best_state, bad, best_step = auc, copy.deepcopy(model.state_dict()), 0, step
        else:
            bad += 1
            if bad >= PATIENCE:
                break
    model.load_state_dict(best_state)
    return auc_of(model, *data["test"]), best_step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.shared, "avazu")):
        print(f"no Avazu slice under {args.shared}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    out = tempfile.mkdtemp(prefix="avazu-quality-")
    dirs = convert(args.shared, out)
    data, vocab_sizes = load(dirs)
    print(f"train {len(data['train'][0])} rows, valid {len(data['valid'][0])}, test {len(data['test'][0])}")
    ours, theirs = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        a, s = recis_run(dirs, seed, out)
        t1 = time.perf_counter()
        b, bs = baseline_run(data, vocab_sizes, seed)
        t2 = time.perf_counter()
        ours.append(a)
        theirs.append(b)
        print(
            f"seed {seed}: RecIS test AUC {a:.4f} (best step {s}, {t1 - t0:.0f} s)   "
            f"plain PyTorch {b:.4f} (best step {bs}, {t2 - t1:.0f} s)"
        )

    def ms(v):
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"

    print(
        f"RecIS {ms(ours)}   plain PyTorch {ms(theirs)}   "
        f"difference {statistics.mean(ours) - statistics.mean(theirs):+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
