"""Serving exports: a trained model as a lookup-only directory.

``export(model, DIR)`` (or ``export_checkpoint(CKPT, DIR)``, what
``recis export CKPT -o DIR`` runs) writes:

- ``table-<k>.<c>.safetensors``: logical table ``k`` (a feature's own, or a
  shared name's; ``meta.json`` maps names to ``k``) in chunks of at most
  ``chunk_rows`` rows: ``ids`` (int64, ascending) and ``rows`` — the
  embeddings only, no optimizer slots — as float32, float16
  (``precision="fp16"``) or row-wise int8 with a float32 ``scales`` per row
  (``precision="int8"``: a row is ``rows * scales``, each value within half
  a step, ``max|row| / 254``, of the trained one);
- ``dense.safetensors``: the dense tower's weights (the model's
  ``state_dict``);
- ``meta.json``: the model spec that rebuilds it (``recis.models.model_spec``:
  zoo name, arguments, every feature's option), features → tables with their
  dims, combiners and the policy for an id the tables do not hold
  (``eval_missing``: "zeros", or "initial", its would-be initial value), the
  input pipeline (``recis.io.pipeline.InputPipeline``) when known, the
  precision and the training step;
- ``baseline.safetensors``: every id of each table at this generation, and
  the table's clock then (what the next delta is computed against; a
  predictor does not read it);
- ``manifest.json``: the format, the kind ("full" or "delta"), a generation
  number (1 for a new export, the replaced export's plus one when one is
  replaced), its lineage (an id every export and delta of one chain
  shares), the model's identity (a digest of its spec), and the size and
  digest of every other file.

``export_delta(model, PARENT, DIR)`` (``recis export --delta PARENT``, and
``ServingExportHook`` every K training steps) writes what changed since the
export or delta ``PARENT``: for each table the rows looked up since then
(``upsert-<k>.<c>.safetensors``, like a full export's chunks: every row
that training may have changed, each with its current value) and the ids
evicted since then (``tombstone-<k>.safetensors``), the dense weights in
full, and a manifest with the lineage, ``generation = parent's + 1`` and
``parent_generation``. ``Predictor.apply`` applies deltas in order; a
predictor that starts from a full export and applies its deltas holds the
same ids and rows, bit for bit, as a full export of the same moment.

A lineage directory holds a chain as ``gen-000001`` (full),
``gen-000002`` (a delta of it), ...: ``Predictor(ROOT)`` loads the newest
full export in it and applies the deltas after it, and ``refresh()``
applies those written since.

Nothing is pickled: safetensors and JSON only. An export is written into a
temporary directory beside ``DIR``, flushed, and renamed into place: a
crash leaves either the old export or the new one, never a mix.
``verify_export`` checks a directory before anything of it is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import numpy as np
import torch
from safetensors.torch import save_file

from recis import _native
from recis.models import model_spec
from recis.nn.engine import dense_only

FORMAT = "recis-serving-export"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
DENSE = "dense.safetensors"
BASELINE = "baseline.safetensors"
PRECISIONS = ("fp32", "fp16", "int8")


class ExportError(ValueError):
    """A serving export that cannot be written, or one that is damaged,
    foreign or of another model: the message names the file and why."""


def model_identity(spec: dict) -> str:
    """A digest of what the model is (its spec: zoo name, arguments and
    features' options): two exports of one model share it."""
    return _native.checksum_bytes(json.dumps(spec, sort_keys=True).encode())


def same_model(a: dict, b: dict) -> bool:
    """Whether the specs ``a`` and ``b`` describe one model: equal once the
    arguments that equal the zoo model's defaults are left out (so that an
    export written before an argument existed is the same model as one
    that records the argument at its default)."""
    return _canonical(a) == _canonical(b)


def _canonical(spec: dict) -> dict:
    import inspect

    out = json.loads(json.dumps(spec))
    try:
        from recis.models import MODELS

        params = inspect.signature(MODELS[out["name"]]).parameters
    except (KeyError, TypeError, ValueError):
        return out
    args = out.get("args")
    if isinstance(args, dict):
        for k, p in params.items():
            if k in args and p.default is not inspect.Parameter.empty:
                default = list(p.default) if isinstance(p.default, tuple) else p.default
                if json.loads(json.dumps(default)) == args[k]:
                    del args[k]
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "digest": _native.checksum_file(path)}


def _write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _quantize(emb: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    if precision == "fp32":
        return {"rows": emb.contiguous()}
    if precision == "fp16":
        return {"rows": emb.to(torch.float16).contiguous()}
    amax = emb.abs().amax(dim=1) if emb.shape[0] else torch.zeros(0)
    scales = amax / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(emb / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return {"rows": q.contiguous(), "scales": scales.to(torch.float32).contiguous()}


def _table_state(view) -> tuple[np.ndarray, np.ndarray]:
    """(ids ascending, their rows) of logical table ``view`` (a ``TableView``):
    the table's keys (16 bytes an id), no values."""
    table, ns = view.table, view.ns
    ids, rows, nss = table.native.export_keys()
    if len(table.namespaces) > 1:
        sel = np.flatnonzero(nss == ns)
        ids, rows = ids[sel], rows[sel]
    order = np.argsort(ids, kind="stable")
    return ids[order], rows[order]


def _last_steps(table, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """The clock at each row's last lookup (u32), a chunk of rows at a time."""
    out = np.empty(len(rows), dtype=np.uint32)
    for start in range(0, len(rows), chunk_rows):
        _v, _f, s = table.native.read_rows(rows[start : start + chunk_rows])
        out[start : start + len(s)] = s
    return out


def _write_rows(view, directory, prefix, ids, rows, precision, chunk_rows) -> list[str]:
    """``ids`` (ascending) with the embeddings of their ``rows`` as
    ``{prefix}.<c>.safetensors`` chunks; the file names. One chunk of rows
    is held at a time. A row holding a NaN or an infinity is refused:
    serving it would score NaN."""
    table = view.table
    dim, width = table.dim, table.dim + table.native.slot_width
    files = []
    for c, start in enumerate(range(0, max(len(ids), 1), chunk_rows)):
        v, _f, _s = table.native.read_rows(rows[start : start + chunk_rows])
        emb = torch.from_numpy(np.ascontiguousarray(v.reshape(-1, width)[:, :dim]))
        bad = ~torch.isfinite(emb).all(dim=1)
        if bool(bad.any()):
            first = int(ids[start : start + chunk_rows][bad.numpy()][0])
            raise ExportError(
                f"table {table.namespaces[view.ns]!r}: {int(bad.sum())} rows hold a NaN or an infinity (id {first} "
                "among them): serving would score NaN; export a checkpoint from before they appeared"
            )
        part = {"ids": torch.from_numpy(ids[start : start + chunk_rows].copy()), **_quantize(emb, precision)}
        name = f"{prefix}.{c:05d}.safetensors"
        save_file(part, os.path.join(directory, name))
        _fsync(os.path.join(directory, name))
        files.append(name)
    return files


def _previous_generation(directory: str) -> int:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return int(json.load(f)["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _zoo(model) -> tuple[torch.nn.Module, dict]:
    model = getattr(model, "module", model)
    spec = model_spec(model)
    if spec is None:
        raise ExportError(
            f"export: {type(model).__name__} is not a zoo model (recis.models): a serving export rebuilds the model "
            "from its spec, which only zoo models record"
        )
    from recis import distributed

    if distributed.active():
        raise ExportError(
            "export: under torchrun each rank holds a shard of the tables; export from a checkpoint instead "
            "(recis export CKPT, in one process: a checkpoint's shards load into one)"
        )
    return model, spec


def _dense_state(model) -> dict[str, torch.Tensor]:
    with dense_only():
        dense = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in dense.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"export: dense tensors {bad} hold a NaN or an infinity: serving would score NaN")
    return dense


def _write_dir(directory: str, overwrite: bool, write) -> str:
    """Runs ``write(tmp) -> manifest fields`` in a temporary directory beside
    ``directory``, adds the checksums of what it wrote, and renames it into
    place (replacing an export there with ``overwrite``)."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ExportError(f"{directory}: exists and is not a directory")
    exists = os.path.isdir(directory) and bool(os.listdir(directory))
    if exists and not overwrite:
        raise ExportError(f"{directory}: not empty; export elsewhere, or pass overwrite=True (--force) to replace it")
    if exists and not os.path.exists(os.path.join(directory, MANIFEST)):
        raise ExportError(f"{directory}: holds files but no export (no {MANIFEST}); it is not replaced")
    previous = _previous_generation(directory) if exists else 0
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = write(tmp, previous)
        names = sorted(os.listdir(tmp))
        manifest.update(format=FORMAT, version=VERSION, created_unix=time.time())
        manifest["files"] = {n: _file_entry(os.path.join(tmp, n)) for n in names}
        _write_json(manifest, os.path.join(tmp, MANIFEST))
        _fsync(tmp)
        if exists:
            old = os.path.join(parent, f".{os.path.basename(directory)}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(directory):
                os.rmdir(directory)  # empty
            os.rename(tmp, directory)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _meta(kind, spec, engine, tables, pipeline, precision, step) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model": spec,
        "features": {
            f: {
                "table": engine.table_of[f],
                "dim": o.dim,
                "combiner": o.combiner,
                "missing": o.eval_missing,
                "padding_id": o.padding_id,
            }
            for f, o in engine.options.items()
        },
        "tables": tables,
        "pipeline": None if pipeline is None else pipeline.to_json(),
        "precision": precision,
        "step": step,
    }


def export(
    model: torch.nn.Module,
    directory: str,
    *,
    pipeline=None,
    precision: str = "fp32",
    step: int | None = None,
    chunk_rows: int = 1 << 20,
    overwrite: bool = False,
    generation: int | None = None,
) -> str:
    """Writes ``model`` (a zoo model: ``recis.models``) as a full serving
    export in ``directory`` and returns its path. ``pipeline``: the
    ``InputPipeline`` its inputs come through (what lets a ``Predictor``
    score ORC files); ``precision``: "fp32", "fp16" or "int8" (the tables'
    rows; the dense tower stays float32); ``overwrite``: replace an export
    already there (its generation + 1, a new lineage); without it an
    existing non-empty directory is refused. ``generation``: its number
    (default: 1, or the replaced export's + 1)."""
    if precision not in PRECISIONS:
        raise ExportError(f"export: precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ExportError(f"export: chunk_rows must be a positive int, got {chunk_rows!r}")
    model, spec = _zoo(model)
    engine = model.embedding

    def write(tmp: str, previous: int) -> dict:
        tables, baseline = {}, {}
        for k, (name, view) in enumerate(engine.logical_tables().items()):
            ids, rows = _table_state(view)
            files = _write_rows(view, tmp, f"table-{k}", ids, rows, precision, chunk_rows)
            tables[name] = {"index": k, "dim": view.dim, "rows": len(ids), "files": files}
            baseline[f"ids-{k}"] = torch.from_numpy(ids)
            baseline[f"clock-{k}"] = torch.tensor([view.table.step], dtype=torch.int64)
        save_file(_dense_state(model), os.path.join(tmp, DENSE))
        save_file(baseline, os.path.join(tmp, BASELINE))
        _write_json(_meta("full", spec, engine, tables, pipeline, precision, step), os.path.join(tmp, META))
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        return {
            "kind": "full",
            "generation": previous + 1 if generation is None else int(generation),
            "lineage": uuid.uuid4().hex,
            "model_id": model_identity(spec),
            "step": step,
        }

    return _write_dir(directory, overwrite, write)


def export_delta(
    model: torch.nn.Module,
    parent: str,
    directory: str,
    *,
    pipeline=None,
    step: int | None = None,
    chunk_rows: int = 1 << 20,
) -> str:
    """Writes what changed in ``model`` since the export or delta ``parent``
    (see the module docstring) as a delta in ``directory``; returns its
    path. The model must be the parent's (the same spec); the precision is
    the parent's. A delta never replaces a directory."""
    from recis.serving.predictor import verify_export

    model, spec = _zoo(model)
    engine = model.embedding
    p_manifest, p_meta = verify_export(parent)
    if p_manifest["model_id"] != model_identity(spec):
        if not same_model(p_meta.get("model", {}), spec):
            raise ExportError(f"{parent}: is an export of another model (its model spec differs from this model's)")
        spec = p_meta["model"]  # the same model, as the parent wrote it (arguments at their defaults it predates)
    precision = p_meta["precision"]
    base = _read_baseline(parent)
    views = engine.logical_tables()
    if set(p_meta["tables"]) != set(views):
        raise ExportError(f"{parent}: holds tables {sorted(p_meta['tables'])}, the model {sorted(views)}")

    def write(tmp: str, _previous: int) -> dict:
        tables, baseline = {}, {}
        for name, view in views.items():
            k = int(p_meta["tables"][name]["index"])
            prev_ids, clock = base[f"ids-{k}"], int(base[f"clock-{k}"][0])
            if view.table.step < clock:
                raise ExportError(
                    f"{parent}: table {name!r} was exported at clock {clock}, later than this model's "
                    f"({view.table.step}): a delta needs a model from after its parent (a resumed run starts a new "
                    "lineage with a full export)"
                )
            ids, rows = _table_state(view)
            last = _last_steps(view.table, rows, chunk_rows)
            new = ~np.isin(ids, prev_ids, assume_unique=True)
            touched = np.flatnonzero(new | (last >= clock))
            gone = prev_ids[~np.isin(prev_ids, ids, assume_unique=True)]
            files = _write_rows(view, tmp, f"upsert-{k}", ids[touched], rows[touched], precision, chunk_rows)
            tomb = f"tombstone-{k}.safetensors"
            save_file({"ids": torch.from_numpy(gone.copy())}, os.path.join(tmp, tomb))
            tables[name] = {
                "index": k,
                "dim": view.dim,
                "rows": len(ids),
                "upserts": len(touched),
                "tombstones": len(gone),
                "files": files,
                "tombstone_file": tomb,
            }
            baseline[f"ids-{k}"] = torch.from_numpy(ids)
            baseline[f"clock-{k}"] = torch.tensor([view.table.step], dtype=torch.int64)
        save_file(_dense_state(model), os.path.join(tmp, DENSE))
        save_file(baseline, os.path.join(tmp, BASELINE))
        _write_json(_meta("delta", spec, engine, tables, pipeline, precision, step), os.path.join(tmp, META))
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        return {
            "kind": "delta",
            "generation": int(p_manifest["generation"]) + 1,
            "parent_generation": int(p_manifest["generation"]),
            "lineage": p_manifest["lineage"],
            "model_id": p_manifest["model_id"],
            "step": step,
        }

    return _write_dir(directory, False, write)


def _read_baseline(parent: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = os.path.join(parent, BASELINE)
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise ExportError(f"{path}: unreadable ({e}); a delta needs its parent's baseline") from None


def export_checkpoint(checkpoint: str, directory: str, delta_of: str | None = None, **kwargs) -> str:
    """Exports a checkpoint written by the Trainer (``recis train``): the
    model is rebuilt from the spec the checkpoint records, its tables and
    dense weights loaded (verified first), and ``export`` writes it with the
    job's input pipeline; with ``delta_of`` (an export or delta of an
    earlier checkpoint of the same run), ``export_delta`` writes what
    changed since. ``kwargs``: ``export``'s."""
    from recis.framework.checkpoint import CheckpointManager, resolve_checkpoint, verify_checkpoint
    from recis.io.pipeline import InputPipeline
    from recis.models import build_model

    path = resolve_checkpoint(checkpoint)
    meta = verify_checkpoint(path)
    extra = meta.get("extra") or {}
    spec = extra.get("model_spec")
    if spec is None:
        raise ExportError(
            f"{path}: records no model spec (it was saved by a RecIS before serving exports, or from a model that is "
            "not a zoo model); load it into its model and call recis.serving.export(model, DIR)"
        )
    model = build_model(spec, f"{path}/meta.json: extra.model_spec")
    pipeline = None
    if extra.get("pipeline") is not None:
        pipeline = InputPipeline.from_json(extra["pipeline"], f"{path}/meta.json: extra.pipeline")
    tables = {t.name: t for t in model.embedding.tables()}
    step = CheckpointManager.reading(os.path.dirname(path)).load(
        path, tables=tables, model=model, parts=("sparse", "dense")
    )
    if delta_of is not None:
        return export_delta(model, delta_of, directory, pipeline=pipeline, step=step, **kwargs)
    return export(model, directory, pipeline=pipeline, step=step, **kwargs)


class ServingExportHook:
    """A Trainer hook that keeps a lineage directory ``root`` up to date
    every ``every_steps`` steps: its first export in a run is a full one
    (``gen-<N+1>``, a new lineage: after a resume the model may be older
    than the newest generation), each later one a delta of the one before.
    ``pipeline``: the input pipeline to record (default: the Trainer's
    ``input_fn`` when it is an ``InputPipeline``)."""

    def __init__(self, root: str, every_steps: int, precision: str = "fp32", pipeline=None):
        if not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(f"ServingExportHook: every_steps must be a positive int, got {every_steps!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"ServingExportHook: precision must be one of {PRECISIONS}, got {precision!r}")
        self.root, self.every_steps, self.precision, self.pipeline = root, every_steps, precision, pipeline
        self.last: str | None = None  # this run's newest generation
        self.written: list[str] = []

    def on_step_end(self, trainer, step: int) -> None:
        if step % self.every_steps:
            return
        from recis.io.pipeline import InputPipeline
        from recis.serving.predictor import generation_dir, lineage

        pipeline = self.pipeline
        if pipeline is None and isinstance(trainer.input_fn, InputPipeline):
            pipeline = trainer.input_fn
        os.makedirs(self.root, exist_ok=True)
        chain = lineage(self.root)
        gen = (chain[-1][0] if chain else 0) + 1
        out = generation_dir(self.root, gen)
        if self.last is None:
            export(trainer.model, out, pipeline=pipeline, precision=self.precision, step=step, generation=gen)
        else:
            export_delta(trainer.model, self.last, out, pipeline=pipeline, step=step)
        self.last = out
        self.written.append(out)
