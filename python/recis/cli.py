"""The ``recis`` command.

``recis demo``: the main job — generates synthetic Criteo-layout ORC data
with a hidden click model (once), trains DeepFM on it through the ORC reader,
prints the loss as it falls and samples/s, evaluates on held-out files (AUC,
log loss, calibration) and saves a checkpoint.
``recis datagen``: writes such data. ``recis convert``: CSV/TSV/Parquet → ORC.
``recis train --config FILE.toml``: a job described in TOML (``recis.config``
documents every field); resumes from the job's latest checkpoint. Under
``torchrun`` (``torchrun --nproc_per_node N -m recis.cli train ...``) the
tables are sharded over the ranks (``recis.distributed``).
``recis eval --config FILE.toml [--checkpoint DIR]``: evaluates a checkpoint
on the config's eval data. ``recis inspect CKPT``: what a checkpoint holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

import recis
from recis import distributed


def demo(args) -> int:
    from recis.datagen import DENSE_COLUMNS, SPARSE_FIELDS, generate, to_model_input
    from recis.framework import Trainer, TrainingArguments
    from recis.io import OrcDataset
    from recis.models import DeepFM
    from recis.optim import SparseAdam

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    # Each demo run trains afresh: the previous run's checkpoints and log go
    # (the generated data is kept and reused).
    shutil.rmtree(os.path.join(args.workdir, "checkpoints"), ignore_errors=True)
    shutil.rmtree(os.path.join(args.workdir, "tensorboard"), ignore_errors=True)
    for name in ("log.jsonl", "curves.png"):
        if os.path.exists(os.path.join(args.workdir, name)):
            os.remove(os.path.join(args.workdir, name))
    data_dir = os.path.join(args.workdir, "data")
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)) if os.path.isdir(data_dir) else []
    if len(files) != 4:
        t0 = time.perf_counter()
        files = generate(data_dir, args.rows, files=4, vocab=args.vocab, seed=args.seed)
        print(f"datagen: {args.rows:,} rows into {data_dir} ({time.perf_counter() - t0:.1f} s)")
    columns = ["label", *DENSE_COLUMNS, *SPARSE_FIELDS]
    train = OrcDataset(files[:3], args.batch_size, columns, shuffle=True, seed=args.seed, num_threads=args.threads)
    held_out = OrcDataset(files[3:], args.batch_size, columns, num_threads=args.threads)
    model = DeepFM(SPARSE_FIELDS, num_dense=len(DENSE_COLUMNS), dim=args.dim, hidden=(400, 400, 400), seed=args.seed)
    sparse_opt = SparseAdam(model, lr=args.lr)
    dense_opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(
        f"recis {recis.__version__}: DeepFM (26 sparse fields, 13 dense, dim {args.dim}, MLP 400-400-400) "
        f"on {train.total_rows():,} rows, batch {args.batch_size}, {args.epochs} epoch(s), {args.threads} threads"
    )
    targs = TrainingArguments(
        output_dir=args.workdir,
        epochs=args.epochs,
        log_every_steps=args.log_every,
        eval_every_steps=args.eval_every,
        keep_checkpoints=2,
        resume=False,
    )
    trainer = Trainer(
        model, targs, train, held_out, dense_optimizer=dense_opt, sparse_optimizer=sparse_opt, input_fn=to_model_input
    )
    t0 = time.perf_counter()
    logs = trainer.train()
    elapsed = time.perf_counter() - t0
    ev = logs["eval"]
    print(
        f"held-out ({held_out.total_rows():,} rows): AUC {ev['auc']:.4f}  log loss {ev['log_loss']:.4f}  "
        f"calibration {ev['calibration']:.3f}"
    )
    print(
        f"train + eval: {train.total_rows() * args.epochs / elapsed:,.0f} training samples/s over "
        f"{trainer.global_step} steps; tables hold {sum(len(t) for t in model.tables()):,} ids; "
        f"checkpoint: {trainer.checkpoints.latest()}; log: {os.path.join(args.workdir, 'log.jsonl')}"
    )
    if trainer.curves_png:
        tb = os.path.join(args.workdir, "tensorboard")
        print(f"curves: {trainer.curves_png}; TensorBoard: tensorboard --logdir {tb}")
    return 0


def set_threads(threads: int | None) -> None:
    """torch's threads (and the Rust core's, when it has not started yet):
    ``threads``, or by default 2 — under torchrun, the machine's cores
    shared among its ranks (``LOCAL_WORLD_SIZE``), so that the ranks of one
    machine do not oversubscribe it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if threads is None:
        threads = max(1, (os.cpu_count() or 2) // local) if local > 1 else 2
    torch.set_num_threads(threads)
    if local > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


def train_cmd(args) -> int:
    from recis.config import ConfigError, Job, load_config
    from recis.framework import CheckpointError, TrainingError

    set_threads(args.threads)
    try:
        cfg = load_config(args.config)
        if args.collective_timeout is not None:
            cfg.trainer.collective_timeout = args.collective_timeout
        # Under torchrun: join the process group; tables are sharded over the
        # ranks, each reads its share of the files, rank 0 writes the logs.
        distributed.init_from_env(timeout=cfg.trainer.collective_timeout or None)
        say = print if distributed.rank() == 0 else (lambda *a, **k: None)
        job = Job(cfg)
        say(
            f"recis {recis.__version__}: {cfg.model['name']} on {len(cfg.features)} sparse fields, "
            f"{len(cfg.data.dense)} dense; {job.train_dataset.total_rows():,} training rows; "
            f"output {cfg.trainer.output_dir}; {distributed.world()} process(es)"
        )
        t0 = time.perf_counter()
        logs = job.trainer.train()
    except (ConfigError, CheckpointError, TrainingError, ValueError, KeyError) as e:
        print(f"recis train: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    ev = logs.get("eval")
    if ev:
        say(f"eval: AUC {ev['auc']:.4f}  log loss {ev['log_loss']:.4f}  calibration {ev['calibration']:.3f}")
    say(f"{job.trainer.global_step} steps in {elapsed:.1f} s; checkpoint: {job.trainer.checkpoints.latest()}")
    if job.trainer.curves_png:
        say(f"curves: {job.trainer.curves_png}")
    return 0


def eval_cmd(args) -> int:
    from recis.config import ConfigError, Job, load_config
    from recis.framework import CheckpointError
    from recis.framework.checkpoint import resolve_checkpoint

    set_threads(args.threads)
    try:
        cfg = load_config(args.config)
        distributed.init_from_env(timeout=args.collective_timeout or cfg.trainer.collective_timeout or None)
        job = Job(cfg, for_training=False)
        if job.eval_dataset is None:
            raise ConfigError(f"{args.config}: [data].eval names no files to evaluate on")
        ckpt = job.trainer.checkpoints
        if args.checkpoint is None and not ckpt.checkpoints(complete=False):
            raise CheckpointError(f"{ckpt.directory}: no checkpoint to evaluate")
        # None: the job's newest checkpoint that verifies.
        path = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
        step = ckpt.load(path, tables=job.trainer.tables, model=job.model, parts=("sparse", "dense"))
        path = ckpt.loaded
        job.trainer.global_step = step
        if distributed.rank() == 0:
            print(f"{path} (step {step}) on {job.eval_dataset.total_rows():,} rows")
        job.trainer.evaluate()
    except (ConfigError, CheckpointError, ValueError, KeyError) as e:
        print(f"recis eval: {e}", file=sys.stderr)
        return 2
    return 0


def inspect_cmd(args) -> int:
    from recis.framework import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"recis inspect: {e}", file=sys.stderr)
        return 2
    print(f"{info['path']}: step {info['step']}")
    print("verified: checksums match" if info["verified"] else "unverified: written without checksums")
    for why in info["suspect"]:
        print(f"suspect: {why}")
    print("sparse tables:")
    for name, t in info["tables"].items():
        print(
            f"  {name:24s} {t['rows']:>12,} rows  dim {t['dim']:<4d} "
            f"optimizer slots {t['slot_width']}  ({t['bytes']:,} bytes)"
        )
        for ns, rows in t.get("namespaces", {}).items():
            print(f"    {ns:22s} {rows:>12,} rows")
    print(f"dense tensors ({len(info['dense'])}, {sum(n for _, n in info['dense'].values()):,} values):")
    for name, (shape, _) in info["dense"].items():
        print(f"  {name:40s} {list(shape)}")
    if info["parts"].get("world_size", 1) > 1:
        print(f"saved by {info['parts']['world_size']} ranks (tables sharded by id; loads into any world size)")
    for key in ("sparse_optimizer", "dense_optimizer", "lr_scheduler", "dataset", "datasets"):
        if key in info["parts"]:
            print(f"{key}: {info['parts'][key]}")
    return 0


def datagen_cmd(args) -> int:
    from recis.datagen import generate

    try:
        paths = generate(args.output, args.rows, files=args.files, vocab=args.vocab, seed=args.seed)
    except ValueError as e:
        print(f"recis datagen: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


TIMEOUT_HELP = (
    "under torchrun: seconds a rank may go silent (or a collective wait) before every rank exits, naming it "
    "(default: [trainer] collective_timeout, else $RECIS_COLLECTIVE_TIMEOUT, else 300)"
)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"recis {recis.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="datagen → ORC → train DeepFM → evaluate → checkpoint")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--rows", type=int, default=400_000, help="rows generated (3/4 train, 1/4 held out)")
    d.add_argument("--epochs", type=int, default=1)
    d.add_argument("--batch-size", type=int, default=4096)
    d.add_argument("--vocab", type=int, default=1_000_000)
    d.add_argument("--dim", type=int, default=16)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--log-every", type=int, default=10)
    d.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps (for the AUC curve)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    g = sub.add_parser("datagen", help="synthetic Criteo-layout ORC files with a hidden click model")
    g.add_argument("--output", "-o", required=True)
    g.add_argument("--rows", type=int, default=1_000_000)
    g.add_argument("--files", type=int, default=4)
    g.add_argument("--vocab", type=int, default=1_000_000)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=datagen_cmd)
    c = sub.add_parser("convert", help="CSV/TSV (Criteo, Avazu or any schema) or Parquet to ORC files")
    c.add_argument("inputs", nargs="+", help="input files, converted in order")
    c.add_argument("--output", "-o", required=True, help="output directory for part-NNNNN.orc")
    c.add_argument("--format", required=True, choices=["criteo", "avazu", "csv", "tsv", "parquet"])
    c.add_argument("--rows-per-file", type=int, default=1_000_000)
    c.add_argument("--rows-per-stripe", type=int, default=1 << 16)
    c.add_argument("--compression", default="zstd", choices=["uncompressed", "zlib", "snappy", "lz4", "zstd"])
    c.add_argument("--no-header", action="store_true", help="the CSV has no header line (avazu dev/test)")
    c.add_argument("--no-label", action="store_true", help="the file has no label column (criteo/avazu test)")
    c.add_argument("--schema", help="csv/tsv column types: name:type,... (int64, float32, float64, string, bool)")
    c.set_defaults(func=convert_cmd)
    t = sub.add_parser("train", help="train the job a TOML config describes (see recis.config)")
    t.add_argument("--config", required=True)
    t.add_argument("--threads", type=int, help="torch threads (default 2; under torchrun the cores / local ranks)")
    t.add_argument("--collective-timeout", type=positive_seconds, metavar="SECONDS", help=TIMEOUT_HELP)
    t.set_defaults(func=train_cmd)
    e = sub.add_parser("eval", help="evaluate a checkpoint of a config's job on its eval data")
    e.add_argument("--config", required=True)
    e.add_argument("--checkpoint", help="checkpoint directory (default: the job's latest)")
    e.add_argument("--threads", type=int, help="torch threads (default 2; under torchrun the cores / local ranks)")
    e.add_argument("--collective-timeout", type=positive_seconds, metavar="SECONDS", help=TIMEOUT_HELP)
    e.set_defaults(func=eval_cmd)
    i = sub.add_parser("inspect", help="list a checkpoint's tables, row counts and dense tensors")
    i.add_argument("checkpoint", help="a ckpt-N directory, or a checkpoints directory (its latest)")
    i.set_defaults(func=inspect_cmd)
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
            rows_per_stripe=args.rows_per_stripe,
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
