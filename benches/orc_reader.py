"""ORC → training batches: RecIS's reader against pyarrow's best path, in one run.

Data: 1M rows, 26 ``list<int64>`` columns of 0-4 ids, 13 float columns and an
int label, written by pyarrow (uncompressed and zstd; default stripes). The
files are generated once into ``--data-dir`` (not the repository).

- RecIS: ``OrcDataset`` (Rust decoder threads + prefetch), batches of 4096
  as torch tensors (dense tensors and RaggedTensors).
- pyarrow: ``ORCFile.read_stripe`` over a thread pool of the same size, then
  each 4096-row slice converted to torch tensors (dense columns as zero-copy
  views, list columns as rebased offsets + values).

    .venv/bin/python benches/orc_reader.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import torch

from recis import RaggedTensor
from recis.io import OrcDataset

LISTS = [f"C{i + 1}" for i in range(26)]
FLOATS = [f"I{i + 1}" for i in range(13)]


def generate(path: str, rows: int, compression: str) -> None:
    rng = np.random.default_rng(0)
    cols = {"label": pa.array(rng.integers(0, 2, rows))}
    for name in FLOATS:
        cols[name] = pa.array(rng.random(rows, dtype=np.float32))
    for name in LISTS:
        lengths = rng.integers(0, 5, rows)
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(rng.integers(0, 2**62, int(offsets[-1])))
        cols[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
    po.write_table(pa.table(cols), path, compression=compression)


def recis_batches(path: str, batch_size: int, threads: int) -> int:
    ds = OrcDataset(path, batch_size, ["label", *FLOATS, *LISTS], num_threads=threads, prefetch=2 * threads)
    rows = 0
    for batch in ds:
        rows += batch["label"].numel()
    return rows


def to_torch(table: pa.Table) -> dict:
    out = {}
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        if pa.types.is_list(arr.type):
            offsets = arr.offsets.to_numpy()
            values = arr.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy()
            out[name] = RaggedTensor(
                torch.from_numpy(values), torch.from_numpy((offsets - offsets[0]).astype(np.int64)), validate=False
            )
        else:
            out[name] = torch.from_numpy(arr.to_numpy())
    return out


def pyarrow_batches(path: str, batch_size: int, threads: int) -> int:
    f = po.ORCFile(path)
    rows = 0
    carry = None
    with ThreadPoolExecutor(threads) as pool:
        for stripe in pool.map(f.read_stripe, range(f.nstripes)):
            table = pa.Table.from_batches([stripe])
            if carry is not None:
                table = pa.concat_tables([carry, table])
            start = 0
            while table.num_rows - start >= batch_size:
                batch = to_torch(table.slice(start, batch_size))
                rows += batch["label"].numel()
                start += batch_size
            carry = table.slice(start)
    if carry is not None and carry.num_rows:
        rows += to_torch(carry)["label"].numel()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default="/tmp/recis-bench-orc")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pa.set_cpu_count(args.threads)
    os.makedirs(args.data_dir, exist_ok=True)
    print(
        f"{args.rows:,} rows: label, 13 floats, 26 list<int64> of 0-4 ids; batches of {args.batch_size}; "
        f"{args.threads} threads; median of {args.repeats}"
    )
    for compression in ("uncompressed", "zstd"):
        path = os.path.join(args.data_dir, f"bench-{args.rows}-{compression}.orc")
        if not os.path.exists(path):
            generate(path, args.rows, compression)
        size = os.path.getsize(path) / 2**20
        times = {}
        for name, fn in (("recis", recis_batches), ("pyarrow", pyarrow_batches)):
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                n = fn(path, args.batch_size, args.threads)
                ts.append(time.perf_counter() - t0)
                assert n == args.rows, (name, n)
            times[name] = statistics.median(ts)
        print(
            f"{compression:12s} ({size:6.1f} MiB, {po.ORCFile(path).nstripes} stripes): "
            f"recis {args.rows / times['recis']:>10,.0f} rows/s   pyarrow {args.rows / times['pyarrow']:>10,.0f} rows/s"
            f"   ratio {times['pyarrow'] / times['recis']:.2f}x"
        )


if __name__ == "__main__":
    main()
