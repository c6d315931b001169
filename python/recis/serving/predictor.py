"""`Predictor`: scores from a serving export.

    p = Predictor("runs/job/export")
    scores = p.predict(inputs)            # model inputs: {feature: RaggedTensor | [B, L] ids, "dense": [B, D]}
    scores = p.predict_batch(batch)       # a reader batch (ORC columns), through the export's input pipeline
    out = p.predict_files(["eval.orc"])   # {"score": ..., "label": ...} as numpy

A multi-task model's (``recis.models.multitask``) scores are [B, T], one
column a task (``Predictor.tasks``: the export pipeline's label columns, the
names the Trainer gave the tasks); ``predict_files`` then gives
``score_<task>`` (and ``label_<task>``) for each task, and ``score`` /
``label`` are the first task's, as the Trainer's ``auc`` is. A single-task
model's scores are [B], as always.

The export is verified first (``verify_export``: every file of its size and
digest, the model spec and tables consistent); the model is rebuilt from
its spec, the dense weights loaded, and each logical table imported into
the Rust table with its embeddings only (no optimizer slots). Scoring runs
the model in eval mode under ``torch.no_grad``: a lookup inserts nothing,
and an id the tables do not hold reads per its feature's policy ("zeros", or
"initial": its would-be initial value), as in the trainer's evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import warnings

import numpy as np
import torch
from safetensors import safe_open

from recis import _native
from recis.nn.engine import dense_only
from recis.nn.hash_table import NO_ROW
from recis.serving.export import DENSE, FORMAT, MANIFEST, META, PRECISIONS, VERSION, ExportError, model_identity


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
    except OSError as e:
        raise ExportError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return obj


def verify_export(directory: str) -> tuple[dict, dict]:
    """(manifest, meta) of the export in ``directory``, after checking that it
    is one (format, version), that every file the manifest lists is a plain
    name in it, present, of its size and digest, and that ``meta.json``'s
    model is the manifest's. Anything else is an ExportError naming the file
    and why."""
    mpath = os.path.join(directory, MANIFEST)
    if not os.path.isfile(mpath):
        raise ExportError(f"{directory}: not a serving export (no {MANIFEST})")
    manifest = _read_json(mpath)
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{mpath}: format {manifest.get('format')!r}, not a RecIS serving export ({FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{mpath}: version {manifest.get('version')!r}; this RecIS reads version {VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or META not in files or DENSE not in files:
        raise ExportError(f"{mpath}: 'files' must list {META} and {DENSE} with their sizes and digests")
    for name, entry in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise ExportError(f"{mpath}: file name {name!r} is not a plain name inside the export")
        entry = entry if isinstance(entry, dict) else {}
        if not (isinstance(entry.get("bytes"), int) and isinstance(entry.get("digest"), str)):
            raise ExportError(f"{mpath}: files[{name!r}] must hold its bytes and digest")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ExportError(f"{path}: missing (the manifest lists it)")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise ExportError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced?)")
        digest = _native.checksum_file(path)
        if digest != entry["digest"]:
            raise ExportError(f"{path}: checksum mismatch (damaged or replaced since the export was written)")
    kind = manifest.get("kind", "full")
    if kind not in ("full", "delta"):
        raise ExportError(f"{mpath}: kind {kind!r} is neither 'full' nor 'delta'")
    for key in ("generation", "lineage", "model_id") + (("parent_generation",) if kind == "delta" else ()):
        if key not in manifest:
            raise ExportError(f"{mpath}: missing {key!r}")
    if not isinstance(manifest["generation"], int) or manifest["generation"] < 1:
        raise ExportError(f"{mpath}: generation must be a positive int, got {manifest['generation']!r}")
    meta = _read_json(os.path.join(directory, META))
    where = os.path.join(directory, META)
    for key in ("model", "features", "tables", "precision"):
        if key not in meta:
            raise ExportError(f"{where}: missing {key!r}")
    if meta.get("kind", "full") != kind:
        raise ExportError(f"{where}: kind {meta.get('kind')!r}, the manifest says {kind!r}")
    if meta["precision"] not in PRECISIONS:
        raise ExportError(f"{where}: precision {meta['precision']!r} is not one of {PRECISIONS}")
    if model_identity(meta["model"]) != manifest.get("model_id"):
        raise ExportError(f"{where}: its model is not the one the manifest names (model_id differs)")
    listed = {f for t in meta["tables"].values() for f in t.get("files", [])} | {META, DENSE}
    listed |= {t["tombstone_file"] for t in meta["tables"].values() if "tombstone_file" in t}
    unlisted = sorted(listed - set(files))
    if unlisted:
        raise ExportError(f"{where}: names files the manifest does not checksum: {unlisted}")
    return manifest, meta


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back
    (so an apply is not starved by a stream of requests)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


GENERATION_DIR = re.compile(r"gen-(\d+)$")


def lineage(root: str) -> list[tuple[int, str]]:
    """The (generation, path) of each ``gen-N`` directory in ``root``, in order."""
    out = []
    for name in os.listdir(root):
        m = GENERATION_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def generation_dir(root: str, generation: int) -> str:
    return os.path.join(root, f"gen-{generation:06d}")


class Predictor:
    """A serving export, loaded for scoring (see the module docstring).

    ``directory``: an export (full), or a lineage directory of ``gen-N``
    exports and deltas: the newest full export that verifies is loaded and
    the deltas after it applied in order (a delta that does not apply ends
    the chain there, with a warning; ``refresh()`` applies those written
    later). Scoring and ``apply`` may run in many threads: a request sees one
    generation, never a mix."""

    def __init__(self, directory: str):
        directory = os.path.abspath(directory)
        self.root = None
        self._lock = _ReadWriteLock()
        if os.path.isfile(os.path.join(directory, MANIFEST)):
            self._open(directory)
            return
        if not os.path.isdir(directory):
            raise ExportError(f"{directory}: no such export")
        chain = lineage(directory)
        if not chain:
            raise ExportError(f"{directory}: not a serving export (no {MANIFEST}) nor a lineage (no gen-N directories)")
        self.root = directory
        refused = []
        for _gen, path in reversed(chain):
            try:
                with open(os.path.join(path, MANIFEST)) as f:
                    kind = json.load(f).get("kind", "full")
            except (OSError, ValueError, AttributeError):
                continue
            if kind != "full":
                continue
            try:
                self._open(path)
                break
            except ExportError as e:
                refused.append(str(e))
        else:
            raise ExportError(
                f"{directory}: no full export in the lineage verifies" + (f" ({'; '.join(refused)})" if refused else "")
            )
        for why in refused:
            warnings.warn(f"recis serving: skipped a newer full export: {why}", stacklevel=2)
        try:
            self.refresh()
        except ExportError as e:
            warnings.warn(f"recis serving: serving generation {self.generation}: {e}", stacklevel=2)

    def _open(self, directory: str) -> None:
        from recis.io.pipeline import InputPipeline
        from recis.models import build_model

        self.directory = directory
        self.manifest, self.meta = verify_export(directory)
        if self.manifest.get("kind", "full") != "full":
            raise ExportError(f"{directory}: a delta, not a full export: apply it to a predictor of its lineage")
        where = os.path.join(directory, META)
        try:
            self.model = build_model(self.meta["model"], f"{where}: model")
        except ValueError as e:
            raise ExportError(str(e)) from None
        self.pipeline = None
        if self.meta.get("pipeline") is not None:
            try:
                self.pipeline = InputPipeline.from_json(self.meta["pipeline"], f"{where}: pipeline")
            except ValueError as e:
                raise ExportError(str(e)) from None
        self.model.load_state_dict(self._read_dense(directory))
        views = self.model.embedding.logical_tables()
        if set(self.meta["tables"]) != set(views):
            raise ExportError(f"{where}: holds tables {sorted(self.meta['tables'])} but its model has {sorted(views)}")
        for t in self.model.embedding.tables():
            t.native.clear()  # a fresh table's id map is sized for training; the import sizes it to the rows
        for name, entry in self.meta["tables"].items():
            view = views[name]
            for file in entry.get("files", []):
                ids, values = self._read_rows(directory, file, name, view.dim)
                zeros = np.zeros(len(ids), dtype=np.uint32)
                view.table.native.import_rows(ids.numpy(), values.numpy(), zeros, zeros, view.ns)
            if len(view) != entry.get("rows", len(view)):
                raise ExportError(f"{where}: table {name!r} should hold {entry['rows']} rows, its files {len(view)}")
        self.model.eval()
        self.tasks = self._tasks()
        self.generation = int(self.manifest["generation"])
        self.lineage = self.manifest.get("lineage")
        self.model_id = self.manifest["model_id"]
        self.step = self.meta.get("step")

    def _tasks(self) -> list[str] | None:
        """A multi-task model's task names: its pipeline's label columns,
        else task_0, task_1...; None for a single-task model."""
        from recis.models import is_multitask

        if not is_multitask(self.model):
            return None
        n = self.model.num_tasks
        labels = self.pipeline.labels if self.pipeline is not None else None
        if labels is not None:
            if len(labels) != n:
                raise ExportError(
                    f"{self.directory}: the pipeline names {len(labels)} labels {labels} but the model has {n} tasks"
                )
            return list(labels)
        return [f"task_{i}" for i in range(n)]

    def _read_dense(self, directory: str) -> dict[str, torch.Tensor]:
        path = os.path.join(directory, DENSE)
        state = _read_tensors(path)
        with dense_only():
            mine = self.model.state_dict()
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise ExportError(f"{path}: dense weights do not fit the model (missing {missing}, extra {unexpected})")
        for k, v in state.items():
            if tuple(v.shape) != tuple(mine[k].shape) or v.dtype != mine[k].dtype:
                raise ExportError(f"{path}: {k} is {v.dtype} {tuple(v.shape)}, the model's {tuple(mine[k].shape)}")
        return state

    def _read_rows(self, directory: str, file: str, name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, float32 rows) of a table file, checked: ids 1-D int64 and
        strictly ascending, rows of the export's precision and ``dim``."""
        path = os.path.join(directory, file)
        part = _read_tensors(path)
        ids, rows = part.get("ids"), part.get("rows")
        if ids is None or rows is None:
            raise ExportError(f"{path}: table {name!r}: needs 'ids' and 'rows'")
        precision = self.meta["precision"]
        want = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[precision]
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ExportError(f"{path}: table {name!r}: ids must be 1-D int64, got {ids.dtype} {ids.dim()}-D")
        if rows.dtype != want or tuple(rows.shape) != (len(ids), dim):
            raise ExportError(
                f"{path}: table {name!r}: rows must be {want} [{len(ids)}, {dim}], got {rows.dtype} {list(rows.shape)}"
            )
        if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ExportError(f"{path}: table {name!r}: ids are not strictly ascending (repeated ids?)")
        values = rows.to(torch.float32)
        if precision == "int8":
            scales = part.get("scales")
            if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (len(ids),):
                raise ExportError(f"{path}: table {name!r}: int8 rows need float32 scales [{len(ids)}]")
            values = values * scales.unsqueeze(1)
        return ids, values.contiguous()

    # -- deltas ---------------------------------------------------------------

    def apply(self, delta: str) -> int:
        """Applies the delta ``delta`` (``export_delta``) and returns the new
        generation. Everything is read and checked first — the files
        (``verify_export``), that it is a delta of this lineage and model,
        and that its parent is the generation served (a gap or a replay is
        refused) — then applied at once, under the lock requests take: a
        request sees the old generation or the new one. On any error the
        predictor keeps serving what it had."""
        delta = os.path.abspath(delta)
        manifest, meta = verify_export(delta)
        if manifest.get("kind") != "delta":
            raise ExportError(f"{delta}: a full export, not a delta (open it with Predictor)")
        if manifest["lineage"] != self.lineage:
            raise ExportError(
                f"{delta}: a delta of another lineage ({manifest['lineage']}; this predictor serves {self.lineage}): "
                "its parent is not an export this predictor holds"
            )
        if manifest["model_id"] != self.model_id:
            raise ExportError(f"{delta}: a delta of another model")
        parent, gen = int(manifest["parent_generation"]), int(manifest["generation"])
        if gen <= self.generation:
            raise ExportError(f"{delta}: generation {gen} is a replay (this predictor serves {self.generation})")
        if parent != self.generation:
            raise ExportError(
                f"{delta}: its parent is generation {parent} but this predictor serves {self.generation}: "
                f"a gap; apply generations {self.generation + 1}..{parent} first"
            )
        if meta["precision"] != self.meta["precision"]:
            raise ExportError(f"{delta}: precision {meta['precision']!r}, the lineage's is {self.meta['precision']!r}")
        views = self.model.embedding.logical_tables()
        if set(meta["tables"]) != set(views):
            raise ExportError(f"{delta}: holds tables {sorted(meta['tables'])}, the model {sorted(views)}")
        dense = self._read_dense(delta)
        changes = []
        for name, entry in meta["tables"].items():
            view = views[name]
            parts = [self._read_rows(delta, f, name, view.dim) for f in entry.get("files", [])]
            ids = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
            values = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, view.dim)
            tomb = _read_tensors(os.path.join(delta, entry.get("tombstone_file", "")))["ids"]
            if tomb.dtype != torch.int64 or tomb.dim() != 1:
                raise ExportError(f"{delta}: table {name!r}: tombstone ids must be 1-D int64")
            changes.append((name, view, ids, values, tomb, int(entry["rows"])))
        with self._lock.write():
            undo = []
            try:
                for name, view, ids, values, tomb, rows in changes:
                    undo.append(self._snapshot(view, torch.cat([ids, tomb])))
                    view.table.native.remove_ids(tomb.numpy(), view.ns)
                    zeros = np.zeros(len(ids), dtype=np.uint32)
                    view.table.native.import_rows(ids.numpy(), values.numpy(), zeros, zeros, view.ns)
                    if len(view) != rows:
                        raise ExportError(
                            f"{delta}: table {name!r} should hold {rows} rows after it, but holds {len(view)}: "
                            "the delta does not continue what this predictor serves"
                        )
                with dense_only():
                    old_dense = {k: v.clone() for k, v in self.model.state_dict().items()}
                self.model.load_state_dict(dense)
            except BaseException:
                for view, added, kept_ids, kept_values in reversed(undo):
                    view.table.native.remove_ids(added, view.ns)
                    zeros = np.zeros(len(kept_ids), dtype=np.uint32)
                    view.table.native.import_rows(kept_ids, kept_values, zeros, zeros, view.ns)
                if "old_dense" in locals():
                    self.model.load_state_dict(old_dense)
                raise
            self.generation, self.step, self.directory = gen, meta.get("step"), delta
        return gen

    @staticmethod
    def _snapshot(view, ids: torch.Tensor):
        """What undoes a change to ``ids`` of ``view``: (view, the ids, those
        of them held now, their rows)."""
        ids_np = ids.numpy()
        rows = view.table.native.lookup(ids_np, view.ns)
        held = np.flatnonzero(rows != NO_ROW)
        v, _f, _s = view.table.native.read_rows(rows[held].astype(np.uint32))
        return view, ids_np, ids_np[held].copy(), np.ascontiguousarray(v.reshape(len(held), -1)[:, : view.dim])

    def refresh(self) -> list[int]:
        """Applies the deltas written into the lineage directory since the
        generation served, in order; the generations applied. The first that
        does not apply raises (the earlier ones stay applied)."""
        if self.root is None:
            return []
        applied = []
        for gen, path in lineage(self.root):
            if gen > self.generation:
                applied.append(self.apply(path))
        return applied

    # -- scoring --------------------------------------------------------------

    def predict(self, inputs: dict) -> torch.Tensor:
        """Click probabilities [B] (float32) of model inputs: each feature's
        ids (RaggedTensor or [B, L] int64), and ``"dense"`` [B, num_dense]
        when the model has dense features. A multi-task model's: [B, T],
        column t the task ``tasks[t]``."""
        return self.predict_generation(inputs)[0]

    def predict_generation(self, inputs: dict) -> tuple[torch.Tensor, int]:
        """``predict``, and the generation that scored it."""
        if not isinstance(inputs, dict):
            raise TypeError(f"Predictor.predict: expected a dict of inputs, got {type(inputs).__name__}")
        features = list(self.meta["features"])
        args = (self.meta.get("model") or {}).get("args") or {}
        vectors = [v[0] for v in args.get("vectors") or []]
        unknown = sorted(set(inputs) - set(features) - {"dense"} - set(vectors))
        if unknown:
            raise KeyError(
                f"Predictor.predict: unknown inputs {unknown} (the model takes {features + vectors} and 'dense')"
            )
        with self._lock.read(), torch.no_grad():
            return torch.sigmoid(self.model(inputs).float()), self.generation

    def predict_batch(self, batch: dict) -> torch.Tensor:
        """Probabilities [B] (multi-task: [B, T]) of a reader batch
        (``OrcDataset``'s columns), through the export's input pipeline."""
        if self.pipeline is None:
            raise ExportError(f"{self.directory}: the export has no input pipeline; call predict() with model inputs")
        return self.predict(self.pipeline(batch))

    def predict_files(self, files, batch_size: int = 4096, num_threads: int = 2) -> dict[str, np.ndarray]:
        """Scores of every row of ORC ``files``, in file order: {"score":
        float32 [N], and "label": float32 [N] when the files hold the
        pipeline's label column}. A multi-task model's: also
        "score_<task>" for each task (and "label_<task>" when the files
        hold every label column); "score" and "label" are the first task's."""
        from recis.io import OrcDataset

        if self.pipeline is None:
            raise ExportError(f"{self.directory}: the export has no input pipeline, so it cannot read files")
        try:
            ds = OrcDataset(files, batch_size, self.pipeline.columns(label=True), num_threads=num_threads)
            label = self.pipeline.label
        except ValueError as e:
            names = self.pipeline.labels or ([self.pipeline.label] if self.pipeline.label else [])
            if not any(f'column "{n}" not found' in str(e) for n in names):
                raise
            ds = OrcDataset(files, batch_size, self.pipeline.columns(label=False), num_threads=num_threads)
            label = None
        label_cols = (self.pipeline.labels or [label]) if label else []
        tasks = self.tasks
        width = len(tasks) if tasks is not None else None
        scores, labels = [], []
        for batch in ds:
            scores.append(self.predict_batch(batch))
            if label_cols:
                labels.append(torch.stack([batch[c].to(torch.float32) for c in label_cols], dim=1))
        shape = (0,) if width is None else (0, width)
        score = torch.cat(scores).numpy() if scores else np.zeros(shape, np.float32)
        if tasks is None:
            out = {"score": score}
            if label:
                out["label"] = torch.cat(labels)[:, 0].numpy() if labels else np.zeros(0, np.float32)
            return out
        out = {"score": np.ascontiguousarray(score[:, 0])}
        out.update({f"score_{t}": np.ascontiguousarray(score[:, i]) for i, t in enumerate(tasks)})
        if label:
            y = torch.cat(labels).numpy() if labels else np.zeros((0, len(label_cols)), np.float32)
            out["label"] = np.ascontiguousarray(y[:, 0])
            if self.pipeline.labels:
                out.update({f"label_{t}": np.ascontiguousarray(y[:, i]) for i, t in enumerate(tasks)})
        return out

    def tables_state(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each logical table's (ids ascending, float32 rows): what it serves."""
        from recis.serving.export import _table_state

        out = {}
        with self._lock.read():
            for name, view in self.model.embedding.logical_tables().items():
                ids, rows = _table_state(view)
                v, _f, _s = view.table.native.read_rows(rows)
                out[name] = (ids, v.reshape(len(ids), -1)[:, : view.dim].copy())
        return out

    def stats(self) -> dict:
        """Memory of the loaded tables: ids, bytes, and bytes per id."""
        ids = sum(len(t) for t in self.model.embedding.tables())
        total = sum(t.stats()["total_bytes"] for t in self.model.embedding.tables())
        return {"ids": ids, "table_bytes": total, "bytes_per_id": total / ids if ids else 0.0}


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(path, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = f.get_tensor(k)
        return out
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise ExportError(f"{path}: unreadable safetensors ({e})") from None
