"""Feature engine: 26 features of mixed ops on a 4096-row batch, in one run:
fused (one native call per op type and depth), unfused (each feature's ops
one by one, native kernels), and the same ops written in plain PyTorch (with
pyfarmhash for strings, which torch cannot hash).

Features (Criteo-like): 10 categorical strings (Hash + Mod), 6 multi-id
columns of 1-3 ids (Mod), 4 floats (Bucketize, 20 boundaries), 3 tag lists of
0-4 strings (Hash into buckets), 2 crosses of id columns (FeatureCross), 1
behaviour sequence of 0-100 ids (SequenceTruncate to 50).

    .venv/bin/python benches/feature_engine.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import farmhash
import numpy as np
import torch

from recis import RaggedTensor
from recis.features import (
    Bucketize,
    Feature,
    FeatureCross,
    FeatureEngine,
    Hash,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
    StringColumn,
)

BOUNDARIES = [float(x) for x in np.linspace(0, 100, 20)]


def make_batch(rows: int, rng: np.random.Generator) -> dict:
    def ids(lo, hi):
        lengths = rng.integers(lo, hi + 1, rows)
        return RaggedTensor.from_lengths(
            torch.from_numpy(rng.integers(0, 2**62, int(lengths.sum()))), torch.from_numpy(lengths)
        )

    batch = {}
    for i in range(10):
        batch[f"cat{i}"] = StringColumn.from_list([f"{x:08x}" for x in rng.integers(0, 2**32, rows)])
    for i in range(6):
        batch[f"ids{i}"] = ids(1, 3)
    for i in range(4):
        batch[f"num{i}"] = torch.from_numpy(rng.random(rows) * 100)
    for i in range(3):
        batch[f"tags{i}"] = StringColumn.from_list(
            [[f"tag{x}" for x in rng.integers(0, 10_000, rng.integers(0, 5))] for _ in range(rows)]
        )
    batch["seq"] = ids(0, 100)
    return batch


def features() -> list[Feature]:
    fs = [Feature(f"cat{i}").add_op(Hash()).add_op(Mod(1 << 22)) for i in range(10)]
    fs += [Feature(f"ids{i}").add_op(Mod(1 << 20)) for i in range(6)]
    fs += [Feature(f"num{i}").add_op(Bucketize(BOUNDARIES)) for i in range(4)]
    fs += [Feature(f"tags{i}").add_op(Hash(1 << 18)) for i in range(3)]
    fs += [
        Feature(f"cross{i}").add_op(SelectFields([f"ids{2 * i}", f"ids{2 * i + 1}"])).add_op(FeatureCross(1 << 20))
        for i in range(2)
    ]
    fs += [Feature("seq").add_op(SelectField("seq")).add_op(SequenceTruncate(50, "left"))]
    assert len(fs) == 26
    return fs


# -- the same ops in plain PyTorch ------------------------------------------------


def strings_of(col: StringColumn) -> list[bytes]:
    data, offs = col.bytes.tobytes(), col.str_offsets
    return [data[offs[k] : offs[k + 1]] for k in range(col.num_strings)]


def torch_hash_strings(col: StringColumn, bucket: int) -> torch.Tensor:
    h = [farmhash.fingerprint64(s) for s in strings_of(col)]
    if bucket:
        h = [x % bucket for x in h]
    return torch.tensor([x - 2**64 if x >= 2**63 else x for x in h], dtype=torch.int64)


def torch_cross(a: RaggedTensor, b: RaggedTensor, bucket: int) -> RaggedTensor:
    la, lb = a.lengths(), b.lengths()
    n = la * lb
    row = torch.repeat_interleave(torch.arange(len(n)), n)
    start = torch.cumsum(n, 0) - n
    k = torch.arange(int(n.sum())) - start[row]
    ia = a.offsets[:-1][row] + torch.div(k, lb[row], rounding_mode="floor")
    ib = b.offsets[:-1][row] + k % lb[row]
    mixed = a.values[ia] * 0x9E3779B97F4A7C15 + b.values[ib]  # a hash combine in int64 arithmetic
    return RaggedTensor(
        torch.remainder(mixed, bucket), torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(n, 0)])
    )


def torch_truncate_left(x: RaggedTensor, max_len: int) -> RaggedTensor:
    lengths = x.lengths()
    keep = torch.clamp(lengths, max=max_len)
    row = torch.repeat_interleave(torch.arange(len(keep)), keep)
    start = torch.cumsum(keep, 0) - keep
    idx = x.offsets[1:][row] - keep[row] + (torch.arange(int(keep.sum())) - start[row])
    return RaggedTensor(x.values[idx], torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep, 0)]))


def plain_torch(batch: dict) -> dict:
    out = plain_torch_numeric(batch)
    for i in range(10):
        out[f"cat{i}"] = torch.remainder(torch_hash_strings(batch[f"cat{i}"], 0), 1 << 22)
    for i in range(3):
        col = batch[f"tags{i}"]
        out[f"tags{i}"] = RaggedTensor(torch_hash_strings(col, 1 << 18), torch.from_numpy(col.offsets))
    return out


NUMERIC = [f"ids{i}" for i in range(6)] + [f"num{i}" for i in range(4)] + ["cross0", "cross1", "seq"]


def plain_torch_numeric(batch: dict) -> dict:
    """The 13 features without strings, in plain PyTorch."""
    out = {}
    bounds = torch.tensor(BOUNDARIES, dtype=torch.float64)
    for i in range(6):
        x = batch[f"ids{i}"]
        out[f"ids{i}"] = RaggedTensor(torch.remainder(x.values, 1 << 20), x.offsets)
    for i in range(4):
        out[f"num{i}"] = torch.bucketize(batch[f"num{i}"], bounds)
    for i in range(2):
        out[f"cross{i}"] = torch_cross(batch[f"ids{2 * i}"], batch[f"ids{2 * i + 1}"], 1 << 20)
    out["seq"] = torch_truncate_left(batch["seq"], 50)
    return out


def timed(fn, batch, repeats: int) -> float:
    fn(batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args.rows, np.random.default_rng(0))
    fused, unfused = FeatureEngine(features()), FeatureEngine(features(), fuse=False)
    t = {
        "fused": timed(fused, batch, args.repeats),
        "unfused": timed(unfused, batch, args.repeats),
        "plain torch": timed(plain_torch, batch, args.repeats),
    }
    print(f"26 features, {args.rows} rows, {args.threads} threads, median of {args.repeats}:")
    for k, v in t.items():
        print(f"  {k:12s} {v * 1e3:8.2f} ms   {args.rows / v:>12,.0f} rows/s")
    print(f"  ratio fused / unfused:     {t['unfused'] / t['fused']:.2f}x")
    print(f"  ratio fused / plain torch: {t['plain torch'] / t['fused']:.2f}x")
    print(
        f"  native calls fused: {len(fused.describe().splitlines())} "
        f"(unfused: {sum(len(f.chain()) - 1 for f in features())})"
    )
    numeric = FeatureEngine([f for f in features() if f.name in NUMERIC])
    tn, tt = timed(numeric, batch, args.repeats), timed(plain_torch_numeric, batch, args.repeats)
    print(
        f"the 13 features without strings: fused {tn * 1e3:.2f} ms, plain torch {tt * 1e3:.2f} ms, ratio {tt / tn:.2f}x"
    )


if __name__ == "__main__":
    main()
