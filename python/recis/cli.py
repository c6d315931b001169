"""The ``recis`` command.

``recis demo``: the main job — generates synthetic Criteo-layout ORC data
with a hidden click model (once), trains DeepFM on it through the ORC reader,
prints the loss as it falls and samples/s, evaluates on held-out files (AUC,
log loss, calibration) and saves a checkpoint, in a ``--workdir`` it marks
as its own (``DEMO_MARKER``; it replaces only its own earlier outputs).
``recis datagen``: writes such data (``--behaviour``: with a target item and
a behaviour sequence column, for DIN/BST). ``recis convert``: CSV/TSV/Parquet → ORC.
``recis train --config FILE.toml``: a job described in TOML (``recis.config``
documents every field; ``--set section.key=value`` changes one,
``--print-config`` shows the result); resumes from the job's latest
checkpoint. Under ``torchrun`` (``torchrun --nproc_per_node N -m recis.cli
train ...``) the tables are sharded over the ranks (``recis.distributed``).
``recis eval --config FILE.toml [--checkpoint DIR]``: evaluates a checkpoint
on the config's eval data. ``recis inspect CKPT``: what a checkpoint holds.
``recis export CKPT -o DIR [--delta PARENT]``: a serving export (or a delta
of one); ``recis predict --export DIR --data FILES -o out.parquet`` scores
files with it; ``recis serve --export DIR``: an HTTP scoring endpoint
(``recis.serving``). ``python -m recis`` is the same command.

Exit status: 0 done; 1 a failure the command reports in one line on stderr
(bad or unreadable data, a checkpoint that does not load, training that
cannot go on); 2 a usage error (bad arguments, a bad config); 3 under
torchrun, a rank that hung (``recis.distributed.watchdog``). Any other
exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

import recis
from recis import distributed

EXIT_FAILED = 1  # a failure the command handled: data, checkpoint, training (one line on stderr)
EXIT_USAGE = 2  # bad arguments or a bad config (argparse's own status for bad arguments)
# 3: recis.distributed.watchdog.EXIT_HUNG, a hung rank under torchrun.


class UsageError(Exception):
    """A bad argument the parser cannot judge alone (it depends on the
    environment or the file system); exits EXIT_USAGE."""


def handled_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, failures): what ``main`` reports in one line, with
    EXIT_USAGE or EXIT_FAILED. Anything else is a bug and is not caught."""
    from recis.config import ConfigError
    from recis.framework import CheckpointError, TrainingError
    from recis.io.convert import ConvertError
    from recis.serving import ExportError

    return (UsageError, ConfigError), (recis.DataError, CheckpointError, TrainingError, ConvertError, ExportError)


DEMO_MARKER = ".recis-demo"
DEMO_OUTPUTS = ("checkpoints", "log.jsonl", "tensorboard", "curves.png")


def prepare_demo_workdir(workdir: str) -> None:
    """Each demo run trains afresh: the previous run's outputs
    (``DEMO_OUTPUTS``) go, the generated data stays for reuse. Only a demo's
    own outputs go: a directory the demo wrote holds ``DEMO_MARKER``, and one
    that holds such outputs without it (another job's run, say) is refused,
    untouched. A new or empty directory becomes the demo's."""
    marker = os.path.join(workdir, DEMO_MARKER)
    found = [name for name in DEMO_OUTPUTS if os.path.lexists(os.path.join(workdir, name))]
    if found and not os.path.isfile(marker):
        raise UsageError(
            f"{workdir} holds {', '.join(found)} but no {DEMO_MARKER}: they are not a demo's, and a demo run would "
            "replace them; pick another --workdir, or remove that directory"
        )
    for name in found:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w") as f:
        f.write("recis demo works here: a later demo run replaces its checkpoints, log and curves\n")


def demo(args) -> int:
    from recis.datagen import DENSE_COLUMNS, SPARSE_FIELDS, generate, to_model_input
    from recis.framework import Trainer, TrainingArguments
    from recis.io import OrcDataset
    from recis.models import DeepFM
    from recis.optim import SparseAdam

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    prepare_demo_workdir(args.workdir)
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


def join_process_group(timeout: float | None) -> None:
    """Under torchrun, joins the process group (``timeout``: the collective
    timeout, None: ``$RECIS_COLLECTIVE_TIMEOUT`` or the default); a bad
    ``$RECIS_COLLECTIVE_TIMEOUT`` is a usage error."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        try:
            distributed.collective_timeout(timeout)
        except ValueError as e:
            raise UsageError(str(e)) from None
    distributed.init_from_env(timeout=timeout)


def train_cmd(args) -> int:
    from recis.config import Job, dump_config, load_config

    set_threads(args.threads)
    cfg = load_config(args.config, args.set or ())
    if args.collective_timeout is not None:
        cfg.trainer.collective_timeout = args.collective_timeout
    if args.print_config:
        print(dump_config(cfg, args.set or ()), end="")
        return 0
    # Under torchrun: join the process group; tables are sharded over the
    # ranks, each reads its share of the files, rank 0 writes the logs.
    join_process_group(cfg.trainer.collective_timeout or None)
    say = print if distributed.rank() == 0 else (lambda *a, **k: None)
    job = Job(cfg)
    say(
        f"recis {recis.__version__}: {cfg.model['name']} on {len(cfg.features)} sparse fields, "
        f"{len(cfg.data.dense)} dense; {job.train_dataset.total_rows():,} training rows; "
        f"output {cfg.trainer.output_dir}; {distributed.world()} process(es)"
    )
    t0 = time.perf_counter()
    logs = job.trainer.train()
    elapsed = time.perf_counter() - t0
    best = logs.get("best")
    if best:
        say(
            f"best: {job.trainer.checkpoints.best()} (valid {best['metric']} {best['value']:.4f} at step "
            f"{best['step']}{'; stopped early' if logs.get('early_stopped') else ''})"
        )
    ev = logs.get("eval")
    if ev:
        of = " (of the best checkpoint)" if cfg.trainer.load_best_at_end and best else ""
        say(f"eval: AUC {ev['auc']:.4f}  log loss {ev['log_loss']:.4f}  calibration {ev['calibration']:.3f}{of}")
        for task in cfg.data.labels or ():
            say(
                f"eval {task}: AUC {ev[f'auc_{task}']:.4f}  log loss {ev[f'log_loss_{task}']:.4f}  "
                f"calibration {ev[f'calibration_{task}']:.3f}"
            )
    say(f"{job.trainer.global_step} steps in {elapsed:.1f} s; checkpoint: {job.trainer.checkpoints.latest()}")
    if job.trainer.curves_png:
        say(f"curves: {job.trainer.curves_png}")
    return 0


def eval_cmd(args) -> int:
    from recis.config import ConfigError, Job, dump_config, load_config
    from recis.framework import CheckpointError
    from recis.framework.checkpoint import BEST, resolve_checkpoint

    set_threads(args.threads)
    overrides = list(args.set or ())
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg, overrides), end="")
        return 0
    if args.data:
        cfg.data.eval = [os.path.abspath(p) for p in args.data]
    join_process_group(args.collective_timeout or cfg.trainer.collective_timeout or None)
    job = Job(cfg, for_training=False)
    if job.eval_dataset is None:
        raise ConfigError(f"{args.config}: [data].eval names no files to evaluate on (or give --data FILES)")
    ckpt = job.trainer.checkpoints
    if args.checkpoint is None and not ckpt.checkpoints(complete=False):
        raise CheckpointError(f"{ckpt.directory}: no checkpoint to evaluate")
    chosen = args.checkpoint
    if chosen == BEST and not os.path.exists(BEST):
        chosen = os.path.join(ckpt.directory, BEST)
        if not os.path.isfile(chosen):
            raise CheckpointError(
                f"{ckpt.directory}: no best checkpoint (the job has no [data].valid, or no validation has run)"
            )
    # None: the job's newest checkpoint that verifies.
    path = resolve_checkpoint(chosen) if chosen else None
    step = ckpt.load(path, tables=job.trainer.tables, model=job.model, parts=("sparse", "dense"))
    path = ckpt.loaded
    job.trainer.global_step = step
    rows = job.eval_dataset.total_rows()
    if distributed.rank() == 0:
        print(f"{path} (step {step}) on {rows:,} rows")
    # Its own record, never the training log (log=False): a test result must
    # not read as one of the run's evaluations.
    metrics = job.trainer.evaluate(log=False)
    if distributed.rank() == 0:
        record = {
            "checkpoint": os.path.abspath(path),
            "step": step,
            "data": list(job.eval_dataset.files),
            "rows": rows,
            "metrics": {k: v for k, v in metrics.items() if k != "step"},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = args.output or os.path.join(cfg.trainer.output_dir, "eval.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if args.output:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
            os.replace(tmp, out)
        else:
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
        print(f"metrics written to {out}")
    return 0


def inspect_cmd(args) -> int:
    from recis.framework import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
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


def export_cmd(args) -> int:
    from recis.serving import export_checkpoint

    if args.delta:
        if args.force or args.precision != "fp32":
            raise UsageError("--delta takes its parent's precision and never replaces a directory")
        out = export_checkpoint(args.checkpoint, args.output, delta_of=args.delta)
    else:
        out = export_checkpoint(args.checkpoint, args.output, precision=args.precision, overwrite=args.force)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    print(
        f"{out}: {manifest['kind']} export, generation {manifest['generation']}, step {manifest['step']}, "
        f"{len(manifest['files'])} files"
    )
    return 0


def predict_cmd(args) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recis.serving import Predictor

    set_threads(args.threads)
    predictor = Predictor(args.export)
    t0 = time.perf_counter()
    out = predictor.predict_files(args.data, batch_size=args.batch_size, num_threads=args.threads or 2)
    elapsed = time.perf_counter() - t0
    table = pa.table({k: np.asarray(v) for k, v in out.items()})
    tmp = args.output + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, args.output)
    n = len(out["score"])
    line = f"{args.output}: {n:,} scores ({n / max(elapsed, 1e-9):,.0f} rows/s, generation {predictor.generation})"
    from recis.metrics import AUROC

    tasks = predictor.tasks
    if tasks is None and "label" in out and n:
        auroc = AUROC()
        auroc.update(torch.from_numpy(out["label"]), torch.from_numpy(out["score"]))
        line += f"; AUC {auroc.compute():.4f} against the files' labels"
    elif tasks is not None and n:
        aucs = []
        for task in tasks:
            if f"label_{task}" in out:
                auroc = AUROC()
                auroc.update(torch.from_numpy(out[f"label_{task}"]), torch.from_numpy(out[f"score_{task}"]))
                aucs.append(f"{task} {auroc.compute():.4f}")
        line += f"; tasks {', '.join(tasks)}"
        if aucs:
            line += f"; AUC {'  '.join(aucs)} against the files' labels"
    print(line)
    return 0


def serve_cmd(args) -> int:
    from recis.serving import Predictor
    from recis.serving.server import Refresher, make_server

    set_threads(1)  # each request thread runs its own forward
    predictor = Predictor(args.export)
    try:
        server = make_server(predictor, host=args.host, port=args.port, threads=args.threads, max_rows=args.max_rows)
    except OSError as e:  # the address is taken, or not ours
        print(f"recis serve: {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"recis serve: {args.export} (generation {predictor.generation}, step {predictor.step}) on "
        f"http://{args.host}:{server.effective_port}/predict",
        flush=True,
    )
    refresher = Refresher(predictor, args.poll_seconds).start() if predictor.root else None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if refresher is not None:
            refresher.stop()
        server.close()
    return 0


def datagen_cmd(args) -> int:
    from recis.datagen import generate

    shape = {k: getattr(args, k) for k in ("items", "categories", "max_history")}
    shape = {k: v for k, v in shape.items() if v is not None}
    if shape and not args.behaviour:
        print("recis datagen: --items, --categories and --max-history go with --behaviour", file=sys.stderr)
        return 2
    extra = dict(behaviour=True, **shape) if args.behaviour else {}
    try:
        paths = generate(
            args.output,
            args.rows,
            files=args.files,
            vocab=args.vocab,
            seed=args.seed,
            vectors=args.vectors,
            tasks=args.tasks,
            **extra,
        )
    except ValueError as e:
        print(f"recis {e}", file=sys.stderr)
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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def schema_spec(text: str) -> str:
    """``--schema`` checked as it is parsed (a bad one is a usage error)."""
    from recis.io.convert import ConvertError, parse_schema

    try:
        parse_schema(text)
    except ConvertError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--schema: ")) from None
    return text


D = " (default: %(default)s)"  # help text's end: argparse fills in the option's default
THREADS_HELP = "torch threads (default: 2; under torchrun the machine's cores / its local ranks)"
SET_HELP = (
    "set a config field after the file loads, as if the file held it (repeatable): the value is TOML "
    '(trainer.epochs=3, optimizer.dense="sgd", data.train=["a.orc"]; a bare word is a string); '
    "feature.NAME.key=value sets a field of the [[feature]] named NAME (default: none)"
)
EXPORT_HELP = "the export directory, or a lineage directory of gen-N exports (required)"
PRINT_HELP = "print the config as resolved (after --set, defaults filled in) as TOML, and exit (default: off)"


def build_parser() -> argparse.ArgumentParser:
    """The ``recis`` command's parser. Every option's help states its default
    (tests/test_cli_usage.py checks it)."""
    parser = argparse.ArgumentParser(prog="recis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"recis {recis.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="datagen → ORC → train DeepFM → evaluate → checkpoint")
    d.add_argument("--workdir", default="runs/demo", help="data, checkpoints, log and curves go here" + D)
    d.add_argument("--rows", type=positive_int, default=400_000, help="rows generated (3/4 train, 1/4 held out)" + D)
    d.add_argument("--epochs", type=positive_int, default=1, help="passes over the training files" + D)
    d.add_argument("--batch-size", type=positive_int, default=4096, help="rows a step" + D)
    d.add_argument("--vocab", type=positive_int, default=1_000_000, help="distinct ids a sparse field draws from" + D)
    d.add_argument("--dim", type=positive_int, default=16, help="embedding width" + D)
    d.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of both Adams (sparse, dense)" + D)
    d.add_argument("--threads", type=positive_int, default=2, help="torch and ORC decoder threads" + D)
    d.add_argument("--log-every", type=positive_int, default=10, help="print the loss every N steps" + D)
    d.add_argument("--eval-every", type=positive_int, default=25, help="evaluate every N steps (the AUC curve)" + D)
    d.add_argument("--seed", type=seed_int, default=0, help="seed of the data, the shuffle and the model" + D)
    d.set_defaults(func=demo)
    g = sub.add_parser("datagen", help="synthetic Criteo-layout ORC files with a hidden click model")
    g.add_argument("--output", "-o", required=True, help="directory for part-NNNNN.orc (required)")
    g.add_argument("--rows", type=positive_int, default=1_000_000, help="rows in all" + D)
    g.add_argument("--files", type=positive_int, default=4, help="files the rows are split into" + D)
    g.add_argument("--vocab", type=positive_int, default=1_000_000, help="distinct ids a sparse field draws from" + D)
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the ids and the click model" + D)
    g.add_argument(
        "--vectors",
        type=int,
        default=0,
        metavar="K",
        help="add item_vec, each row's item as a K-float content vector (list<float>) the clicks depend on "
        "(default: 0)",
    )
    g.add_argument(
        "--tasks",
        type=int,
        choices=[1, 2],
        default=1,
        help="labels written: 1, the click label; 2, also 'conversion' (click AND a hidden conversion model's draw: "
        "multi-task and ESMM data)" + D,
    )
    g.add_argument(
        "--behaviour",
        action="store_true",
        help="add a target item column (item) and a behaviour sequence column (hist_items: the items clicked "
        "before, oldest first), with a click model in which the target's relation to the recent history counts "
        "(default: off)",
    )
    g.add_argument("--items", type=positive_int, help="with --behaviour: items in the catalogue (default: 1000)")
    g.add_argument("--categories", type=positive_int, help="with --behaviour: hidden item categories (default: 20)")
    g.add_argument("--max-history", type=seed_int, help="with --behaviour: the longest history (default: 40)")
    g.set_defaults(func=datagen_cmd)
    c = sub.add_parser("convert", help="CSV/TSV (Criteo, Avazu or any schema) or Parquet to ORC files")
    c.add_argument("inputs", nargs="+", help="input files, converted in order")
    c.add_argument("--output", "-o", required=True, help="output directory for part-NNNNN.orc (required)")
    c.add_argument(
        "--format",
        required=True,
        choices=["criteo", "avazu", "csv", "tsv", "parquet"],
        help="the inputs' layout: criteo (TSV, 40 columns), avazu (CSV), csv or tsv (header and --schema), parquet "
        "(required)",
    )
    c.add_argument("--rows-per-file", type=positive_int, default=1_000_000, help="rows of each ORC file" + D)
    c.add_argument(
        "--rows-per-stripe",
        type=positive_int,
        default=1 << 16,
        help="rows of each ORC stripe, the unit that is shuffled and sharded" + D,
    )
    c.add_argument(
        "--compression",
        default="zstd",
        choices=["uncompressed", "zlib", "snappy", "lz4", "zstd"],
        help="ORC compression" + D,
    )
    c.add_argument(
        "--no-header",
        action="store_true",
        help="the CSV has no header line (avazu dev/test) (default: off, the first line names the columns)",
    )
    c.add_argument(
        "--no-label",
        action="store_true",
        help="the file has no label column (criteo/avazu test) (default: off, it has one)",
    )
    c.add_argument(
        "--schema",
        type=schema_spec,
        help="csv/tsv column types: name:type,... (int64, float32, float64, string, bool, or list<T> of one of "
        "these but bool: values joined by --list-delimiter) (default: none, the first file's types are inferred "
        "and fixed for every later file)",
    )
    c.add_argument(
        "--list-delimiter",
        default="|",
        help="what joins the values of a list<T> field of --schema" + D,
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output directory's part-*.orc files (default: off, such a directory is refused)",
    )
    c.set_defaults(func=convert_cmd)
    t = sub.add_parser("train", help="train the job a TOML config describes (see recis.config)")
    t.add_argument("--config", required=True, help="the job's TOML file (required)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help=SET_HELP)
    t.add_argument("--print-config", action="store_true", help=PRINT_HELP)
    t.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    t.add_argument("--collective-timeout", type=positive_seconds, metavar="SECONDS", help=TIMEOUT_HELP)
    t.set_defaults(func=train_cmd)
    e = sub.add_parser("eval", help="evaluate a checkpoint of a config's job on its eval data")
    e.add_argument("--config", required=True, help="the job's TOML file (required)")
    e.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help=SET_HELP)
    e.add_argument("--print-config", action="store_true", help=PRINT_HELP)
    e.add_argument(
        "--checkpoint",
        help="a ckpt-N directory, a checkpoints directory (its newest that verifies), or 'best' (the job's best "
        "by validation) (default: the job's newest that verifies)",
    )
    e.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="ORC files or directories to evaluate on (default: the config's [data].eval)",
    )
    e.add_argument(
        "--output",
        "-o",
        help="write the metrics record to this JSON file (default: append it to output_dir/eval.jsonl, never to "
        "the training log)",
    )
    e.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    e.add_argument("--collective-timeout", type=positive_seconds, metavar="SECONDS", help=TIMEOUT_HELP)
    e.set_defaults(func=eval_cmd)
    i = sub.add_parser("inspect", help="list a checkpoint's tables, row counts and dense tensors")
    i.add_argument("checkpoint", help="a ckpt-N directory, or a checkpoints directory (its latest)")
    i.set_defaults(func=inspect_cmd)
    x = sub.add_parser("export", help="a checkpoint as a lookup-only serving export (recis.serving)")
    x.add_argument("checkpoint", help="a ckpt-N directory, or a checkpoints directory (its newest that verifies)")
    x.add_argument("--output", "-o", required=True, help="the export directory to write (required)")
    x.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "int8"],
        help="the tables' rows: fp32, fp16, or row-wise int8 with a scale a row" + D,
    )
    x.add_argument("--force", action="store_true", help="replace an export already there (default: refuse)")
    x.add_argument(
        "--delta",
        metavar="PARENT",
        help="write a delta of what changed since the export or delta PARENT (default: a full export)",
    )
    x.set_defaults(func=export_cmd)
    p = sub.add_parser("predict", help="score ORC files with a serving export, into a Parquet file")
    p.add_argument("--export", required=True, help=EXPORT_HELP)
    p.add_argument("--data", required=True, nargs="+", help="ORC files or directories of *.orc to score (required)")
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="the Parquet file: score, and label if read; a multi-task model's: also score_<task> (and label_<task>) "
        "a task, score and label being the first task's (required)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4096, help="rows a batch" + D)
    p.add_argument("--threads", type=positive_int, help="torch and reader threads (default: 2)")
    p.set_defaults(func=predict_cmd)
    v = sub.add_parser("serve", help="an HTTP scoring endpoint over a serving export (JSON rows in, scores out)")
    v.add_argument("--export", required=True, help=EXPORT_HELP)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on" + D)
    v.add_argument("--port", type=positive_int, default=8080, help="port to listen on" + D)
    v.add_argument("--threads", type=positive_int, default=4, help="request threads" + D)
    v.add_argument("--max-rows", type=positive_int, default=65536, help="rows a request may hold" + D)
    v.add_argument(
        "--poll-seconds",
        type=positive_seconds,
        default=10.0,
        help="served from a lineage directory: seconds between looks for new deltas to apply" + D,
    )
    v.set_defaults(func=serve_cmd)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    usage, failures = handled_errors()
    try:
        return args.func(args)
    except usage as e:
        print(f"recis {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except failures as e:
        print(f"recis {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED


def convert_cmd(args) -> int:
    from recis.io.convert import convert

    files = convert(
        args.inputs,
        args.output,
        args.format,
        rows_per_file=args.rows_per_file,
        rows_per_stripe=args.rows_per_stripe,
        list_delimiter=args.list_delimiter,
        overwrite=args.overwrite,
        compression=args.compression,
        header=not args.no_header,
        label=not args.no_label,
        schema=args.schema,
    )
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
