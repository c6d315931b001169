"""`recis serve` under load: requests/s and latency at batch 1 and 256.

A DeepFM (26 sparse fields, 13 dense, dim 16, MLP 400-400-400) is trained
for a few hundred steps on synthetic Criteo-layout data (``recis datagen``)
and exported; ``recis serve`` runs it in a subprocess; client threads, each
on its own keep-alive connection (``http.client``), post requests of real
rows read from the held-out file for ``--seconds`` per setting. Printed per
(batch, clients): requests/s, rows/s, p50 and p99 latency, and — to show
what the HTTP layer costs — ``Predictor.predict_batch`` on the same rows in
this process, one thread (the in-process floor).

    .venv/bin/python benches/serving_http.py [--seconds 10] [--clients 1,4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow.orc as po

from recis.datagen import DENSE_COLUMNS, SPARSE_FIELDS, generate

CONFIG = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc", "data/part-00002.orc"]
eval = ["data/part-00003.orc"]
dense = {dense}
dense_transform = "log1p"
batch_size = 1024

[model]
name = "deepfm"
dim = 16

{features}

[trainer]
output_dir = "out"
max_steps = {steps}
log_every_steps = 1000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, body: bytes, until: float, lat: list, errors: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        conn.request("POST", "/predict", body, headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            errors.append(data[:200])
            return
        lat.append(time.perf_counter() - t0)
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "recis-serving-bench"))
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--server-threads", type=int, default=4)
    args = ap.parse_args()
    wd = args.workdir
    data = os.path.join(wd, "data")
    if not os.path.isdir(data):
        generate(data, args.rows, files=4, vocab=1_000_000, seed=0)
    export_dir = os.path.join(wd, "export")
    if not os.path.isdir(export_dir):
        features = "\n".join(f'[[feature]]\nname = "{f}"' for f in SPARSE_FIELDS)
        with open(os.path.join(wd, "job.toml"), "w") as f:
            f.write(CONFIG.format(dense=json.dumps(list(DENSE_COLUMNS)), features=features, steps=args.steps))
        run = [sys.executable, "-m", "recis.cli"]
        subprocess.run([*run, "train", "--config", os.path.join(wd, "job.toml")], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*run, "export", os.path.join(wd, "out", "checkpoints"), "-o", export_dir], check=True)
    from recis.io import OrcDataset
    from recis.serving import Predictor

    predictor = Predictor(export_dir)
    from recis.config import Job, load_config

    job = Job(load_config(os.path.join(wd, "job.toml")), for_training=False)
    job.trainer.checkpoints.load(None, tables=job.trainer.tables, model=job.model)
    train_tables = job.model.embedding.tables()
    train_bytes = sum(t.stats()["total_bytes"] for t in train_tables) / sum(len(t) for t in train_tables)
    del job, train_tables
    held_out = os.path.join(data, "part-00003.orc")
    rows = po.read_table(held_out, columns=[*SPARSE_FIELDS, *DENSE_COLUMNS]).slice(0, 256).to_pylist()
    print(
        f"DeepFM, 26 sparse fields + 13 dense, dim 16; tables hold {predictor.stats()['ids']:,} ids "
        f"({predictor.stats()['bytes_per_id']:.0f} bytes an id served, {train_bytes:.0f} in training with Adam); "
        f"{os.cpu_count()} cores; server threads "
        f"{args.server_threads}; {args.seconds:g} s a setting"
    )
    cols = predictor.pipeline.columns(label=False)
    batches = {int(b): next(iter(OrcDataset([held_out], int(b), cols))) for b in args.batches.split(",")}
    for b, batch in batches.items():
        predictor.predict_batch(batch)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            predictor.predict_batch(batch)
            n += 1
        dt = (time.perf_counter() - t0) / n
        print(f"in-process Predictor, batch {b:4d}: {1 / dt:9,.0f} batches/s {b / dt:11,.0f} rows/s {dt * 1e3:6.2f} ms")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "recis.cli", "serve", "--export", export_dir, "--port", str(port)]
        + ["--threads", str(args.server_threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server.stdout.readline()  # "recis serve: ... on http://..."
        for b in batches:
            body = json.dumps({"rows": rows[:b]}).encode()
            for c in (int(x) for x in args.clients.split(",")):
                lats: list[list[float]] = [[] for _ in range(c)]
                errors: list = []
                warm = time.perf_counter() + 1.0
                client(port, body, warm, [], errors)
                until = time.perf_counter() + args.seconds
                threads = [threading.Thread(target=client, args=(port, body, until, lats[k], errors)) for k in range(c)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - t0
                if errors:
                    raise SystemExit(f"server errors: {errors[:3]}")
                all_lat = np.array([x for lat in lats for x in lat])
                print(
                    f"HTTP batch {b:4d}, {c} client(s): {len(all_lat) / elapsed:9,.0f} requests/s "
                    f"{len(all_lat) * b / elapsed:11,.0f} rows/s  p50 {np.percentile(all_lat, 50) * 1e3:7.2f} ms  "
                    f"p99 {np.percentile(all_lat, 99) * 1e3:7.2f} ms  "
                    f"(median of {statistics.median([len(x) for x in lats])} requests a client)"
                )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
