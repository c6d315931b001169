"""Checkpoints: atomic, safetensors + JSON, no pickle.

A checkpoint is a directory ``ckpt-<step>`` inside the manager's directory:

- ``table-<name>.<k>.safetensors``: a sparse table in chunks of up to
  ``table_chunk_rows`` rows (ids, rows with optimizer slots, frequency, last
  step; the first chunk also the admission counters), written and read a
  chunk at a time so that a huge table is never held twice in memory
  (checkpoints of one ``table-<name>.safetensors`` still load);
- ``dense.safetensors``: the dense model's state dict;
- ``dense_optimizer.safetensors`` + the JSON part in ``meta.json``: a torch
  optimizer's state (tensors by flat key, the rest as JSON);
- ``rng.safetensors``: torch's CPU RNG state;
- ``meta.json``: the step, every table's config, sparse optimizer, LR
  scheduler, data reader cursor, numpy/Python RNG states, and user extras.

Saved by several ranks (``recis.distributed``), each table is one shard a
rank (``table-<name>.r<rank>.<k>.safetensors``), each rank has its own
cursor and RNG state (``rank-<r>.json``, ``rng.r<rank>.safetensors``), and
the dense state is written once. Such a checkpoint resumes exactly in the
same world size; its tables (and dense state and optimizers) load into any
world size, each rank keeping the ids it owns there.

It is written under a temporary name, its files flushed to disk, then renamed
to ``ckpt-<step>``; the ``latest`` pointer is replaced (also by rename) only
after that, and older checkpoints beyond ``keep_last`` are removed last. A
crash at any point leaves the previous checkpoints intact; a half-written
temporary directory is ignored and cleaned up by the next save, and the
newest complete checkpoint is the latest even if the crash came before the
pointer was replaced (``tests/test_kill.py``).
Loading an untrusted checkpoint cannot run code: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recis import distributed

FORMAT = 1
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file or part."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _split_optimizer_state(sd: dict) -> tuple[dict, dict]:
    """torch optimizer state -> (tensors by flat key, JSON part)."""
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
            else:
                entry[k] = v
        plain[str(pid)] = entry
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def _join_optimizer_state(tensors: dict, plain: dict) -> dict:
    state: dict = {int(pid): dict(entry) for pid, entry in plain["state"].items()}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": plain["param_groups"]}


class CheckpointManager:
    """Saves and restores training state in ``directory``.

    Example::

        ckpt = CheckpointManager("runs/x/checkpoints", keep_last=3)
        ckpt.save(step, tables=model.tables_by_name(), model=model, dense_optimizer=opt, dataset=ds)
        step = ckpt.load(tables=..., model=model, dense_optimizer=opt, dataset=ds)   # latest
    """

    def __init__(self, directory: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1, got {keep_last}")
        self.directory = directory
        self.keep_last = keep_last
        self.table_chunk_rows = 1 << 20
        os.makedirs(directory, exist_ok=True)

    # -- saving ---------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        tables=None,
        model: torch.nn.Module | None = None,
        dense_optimizer=None,
        sparse_optimizer=None,
        lr_scheduler=None,
        dataset=None,
        extra: dict | None = None,
    ) -> str:
        """Writes ``ckpt-<step>`` atomically and points ``latest`` at it.

        Under torchrun every rank calls this at the same step: each writes
        its shard of the tables, its reader cursor and RNG state into the
        temporary directory, in parallel; rank 0 then writes the dense state
        (the same on every rank) and ``meta.json``, renames and points
        ``latest``. The directory must be one every rank sees."""
        tables = dict(tables or {})
        rank, n = distributed.rank(), distributed.world()
        final = os.path.join(self.directory, f"ckpt-{step}")
        if os.path.exists(final):
            raise CheckpointError(f"{final} exists already; steps must increase")
        tmp = os.path.join(self.directory, f".tmp-ckpt-{step}-{self._writer_id()}")
        if rank == 0:
            self._clean_temporaries()
            os.makedirs(tmp)
        distributed.barrier()
        mine = self._save_rank(tmp, tables, dataset, rank, n)
        distributed.barrier()
        if rank == 0:
            ranks = [mine] + [self._read_json(os.path.join(tmp, f"rank-{r}.json")) for r in range(1, n)]
            self._save_dense(tmp, step, tables, ranks, model, dense_optimizer, sparse_optimizer, lr_scheduler, extra)
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._point_latest(os.path.basename(final))
            self._prune()
        distributed.barrier()
        return final

    @staticmethod
    def _writer_id() -> int:
        """Rank 0's process id (the temporary directory's name, agreed by all)."""
        t = torch.tensor([os.getpid()], dtype=torch.int64)
        if distributed.active():
            torch.distributed.broadcast(t, 0)
        return int(t.item())

    @staticmethod
    def _read_json(path: str) -> dict:
        with open(path) as f:
            return json.load(f)

    def _save_rank(self, tmp: str, tables: dict, dataset, rank: int, n: int) -> dict:
        """This rank's part: its table shards, reader cursor and RNG states."""
        tag = f".r{rank}" if n > 1 else ""
        info: dict = {"tables": {}}
        for name, table in tables.items():
            # In chunks of rows: a huge table is never held twice in memory.
            files = table.save(tmp, f"table-{name}{tag}", chunk_rows=self.table_chunk_rows)
            info["tables"][name] = {"rows": len(table), "files": files}
            if len(table.namespaces) > 1:
                info["tables"][name]["namespace_rows"] = [table.native.len_in(k) for k in range(len(table.namespaces))]
        if dataset is not None:
            info["dataset"] = dataset.state_dict()
        info["rng_file"] = f"rng{tag}.safetensors"
        _save_tensors({"torch_cpu": torch.get_rng_state()}, os.path.join(tmp, info["rng_file"]))
        np_state = np.random.get_state()
        info["rng"] = {
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }
        if n > 1:
            _write_json(info, os.path.join(tmp, f"rank-{rank}.json"))
        return info

    def _save_dense(self, tmp, step, tables, ranks, model, dense_optimizer, sparse_optimizer, lr_scheduler, extra):
        meta: dict = {"format": FORMAT, "step": step, "world_size": len(ranks), "tables": {}, "extra": extra or {}}
        for name, table in tables.items():
            shards = [r["tables"][name]["files"] for r in ranks]
            meta["tables"][name] = {
                "config": table.table_config(),
                "slot_width": table.native.slot_width,
                "rows": sum(r["tables"][name]["rows"] for r in ranks),
                "files": [f for files in shards for f in files],
            }
            if len(table.namespaces) > 1:
                per_rank = [r["tables"][name]["namespace_rows"] for r in ranks]
                meta["tables"][name]["namespace_rows"] = dict(
                    zip(table.namespaces, (sum(c) for c in zip(*per_rank, strict=True)), strict=True)
                )
            if len(ranks) > 1:
                meta["tables"][name]["shards"] = shards
        if model is not None:
            _save_tensors(model.state_dict(), os.path.join(tmp, "dense.safetensors"))
            meta["dense_keys"] = sorted(model.state_dict())
        if dense_optimizer is not None:
            tensors, plain = _split_optimizer_state(dense_optimizer.state_dict())
            _save_tensors(tensors, os.path.join(tmp, "dense_optimizer.safetensors"))
            meta["dense_optimizer"] = plain
        if sparse_optimizer is not None:
            meta["sparse_optimizer"] = sparse_optimizer.state_dict()
        if lr_scheduler is not None:
            meta["lr_scheduler"] = lr_scheduler.state_dict()
        if len(ranks) == 1:
            if "dataset" in ranks[0]:
                meta["dataset"] = ranks[0]["dataset"]
            meta["rng"] = ranks[0]["rng"]
        else:
            if "dataset" in ranks[0]:
                meta["datasets"] = [r["dataset"] for r in ranks]
            meta["rng_ranks"] = [{"file": r["rng_file"], **r["rng"]} for r in ranks]
        _write_json(meta, os.path.join(tmp, "meta.json"))

    def _point_latest(self, name: str) -> None:
        tmp = os.path.join(self.directory, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, LATEST))
        _fsync_dir(self.directory)

    def _clean_temporaries(self) -> None:
        for entry in os.listdir(self.directory):
            if entry.startswith(".tmp-ckpt-"):
                shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)

    def checkpoints(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        found = []
        for entry in os.listdir(self.directory):
            if entry.startswith("ckpt-") and os.path.isfile(os.path.join(self.directory, entry, "meta.json")):
                try:
                    found.append((int(entry[5:]), entry))
                except ValueError:
                    continue
        return [os.path.join(self.directory, e) for _, e in sorted(found)]

    def _prune(self) -> None:
        # Renamed away first: a crash mid-delete leaves a temporary, never a
        # checkpoint with some of its files gone.
        for path in self.checkpoints()[: -self.keep_last]:
            doomed = os.path.join(self.directory, f".tmp-ckpt-pruned-{os.path.basename(path)}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def latest(self) -> str | None:
        """The newest complete checkpoint. The ``latest`` pointer names it
        too, except after a crash between a checkpoint's rename and the
        pointer's update; the complete directory is the truth then."""
        found = self.checkpoints()
        return found[-1] if found else None

    def mend_pointer(self) -> None:
        """Points ``latest`` at the newest complete checkpoint if a crash
        left it behind (between a checkpoint's rename and the pointer's
        update)."""
        found = self.latest()
        if found is None:
            return
        pointer, current = os.path.join(self.directory, LATEST), None
        if os.path.isfile(pointer):
            with open(pointer) as f:
                current = f.read()
        if current != os.path.basename(found):
            self._point_latest(os.path.basename(found))

    @classmethod
    def reading(cls, directory: str) -> CheckpointManager:
        """A manager of an existing directory, to read (creates nothing)."""
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        m = cls.__new__(cls)
        m.directory, m.keep_last, m.table_chunk_rows = directory, 1, 1 << 20
        return m

    # -- loading --------------------------------------------------------------

    def load(
        self,
        path: str | None = None,
        *,
        tables=None,
        model: torch.nn.Module | None = None,
        dense_optimizer=None,
        sparse_optimizer=None,
        lr_scheduler=None,
        dataset=None,
        parts: tuple[str, ...] = ("sparse", "dense", "optimizer", "data", "rng"),
    ) -> int:
        """Restores what is given from ``path`` (default: latest) and returns
        its step. ``parts`` selects what to restore (warm start: e.g.
        ``("sparse", "dense")``; without "optimizer", tables keep the saved
        embeddings and start their optimizer slots afresh). Everything is checked before anything is
        changed: a checkpoint of another model or table set is refused."""
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"{self.directory}: no checkpoint")
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: format {meta.get('format')} is not {FORMAT}")
        tables = dict(tables or {})
        rank, n = distributed.rank(), distributed.world()
        saved_world = int(meta.get("world_size", 1))
        if saved_world != n and ({"data", "rng"} & set(parts)):
            raise CheckpointError(
                f"{path}: was saved by {saved_world} ranks and this run has {n}: the readers' cursors and RNG "
                "states are per rank, so it cannot resume exactly here; load it with "
                "parts=('sparse', 'dense', 'optimizer') (tables are re-sharded to any world size)"
            )
        if "sparse" in parts:
            saved = set(meta["tables"])
            if set(tables) != saved:
                raise CheckpointError(f"{path}: holds tables {sorted(saved)} but the model has {sorted(tables)}")
            for name, table in tables.items():
                mine, theirs = table.table_config(), meta["tables"][name]["config"]
                ns_mine = [n for n, _ in mine.get("namespaces", [])]
                ns_theirs = [n for n, _ in theirs.get("namespaces", [])]
                if ns_mine != ns_theirs:
                    raise CheckpointError(
                        f"{path}: holds tables {ns_theirs or [name]} in table {name!r} but the model has "
                        f"{ns_mine or [name]} there"
                    )
                if mine != theirs:
                    diff = sorted(k for k in mine if mine.get(k) != theirs.get(k))
                    raise CheckpointError(f"{path}: table {name!r} was saved with another config (differs in {diff})")
                width = meta["tables"][name]["slot_width"]
                if "optimizer" in parts and width != table.native.slot_width:
                    raise CheckpointError(
                        f"{path}: table {name!r} was saved with {width} optimizer slot values a row, this table has "
                        f"{table.native.slot_width} (another sparse optimizer?)"
                    )
        dense_state = None
        if "dense" in parts and model is not None:
            dense_file = os.path.join(path, "dense.safetensors")
            if not os.path.isfile(dense_file):
                raise CheckpointError(f"{path}: has no dense model")
            dense_state = load_file(dense_file)
            mine = set(model.state_dict())
            if set(dense_state) != mine:
                missing, unexpected = sorted(mine - set(dense_state)), sorted(set(dense_state) - mine)
                raise CheckpointError(
                    f"{dense_file}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            for k, v in model.state_dict().items():
                if dense_state[k].shape != v.shape:
                    raise CheckpointError(
                        f"{dense_file}: {k} has shape {tuple(dense_state[k].shape)}, the model's is {tuple(v.shape)}"
                    )
        # Checked: now restore.
        if "sparse" in parts:
            for name, table in tables.items():
                saved_table = meta["tables"][name]
                files = saved_table.get("files")
                if files is None:  # a checkpoint of one file a table
                    state = load_file(os.path.join(path, f"table-{name}.safetensors"))
                    table.load_state_dict(state, embeddings_only="optimizer" not in parts)
                    continue
                shards = saved_table.get("shards", [files])
                if len(shards) == n:  # the same sharding: this rank's files
                    table.load(path, shards[rank], embeddings_only="optimizer" not in parts)
                else:  # re-sharded: the ids this rank owns, from every file
                    table.load(
                        path,
                        [f for fs in shards for f in fs],
                        embeddings_only="optimizer" not in parts,
                        keep=(lambda ids: distributed.owner_of(ids, n) == rank) if n > 1 else None,
                        merged=len(shards),
                    )
        if dense_state is not None:
            model.load_state_dict(dense_state)
        if "optimizer" in parts:
            if dense_optimizer is not None and "dense_optimizer" in meta:
                tensors = load_file(os.path.join(path, "dense_optimizer.safetensors"))
                dense_optimizer.load_state_dict(_join_optimizer_state(tensors, meta["dense_optimizer"]))
            if sparse_optimizer is not None and "sparse_optimizer" in meta:
                sparse_optimizer.load_state_dict(meta["sparse_optimizer"])
            if lr_scheduler is not None and "lr_scheduler" in meta:
                lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if "data" in parts and dataset is not None:
            if "datasets" in meta:
                dataset.load_state_dict(meta["datasets"][rank])
            elif "dataset" in meta:
                dataset.load_state_dict(meta["dataset"])
        if "rng" in parts:
            rng = meta["rng_ranks"][rank] if "rng_ranks" in meta else {"file": "rng.safetensors", **meta["rng"]}
            torch.set_rng_state(load_file(os.path.join(path, rng["file"]))["torch_cpu"])
            s = rng["numpy"]
            np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
            p = rng["python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
        return int(meta["step"])


def resolve_checkpoint(path: str) -> str:
    """``path`` if it is a checkpoint (a ``ckpt-N`` directory), else the
    latest complete checkpoint in the checkpoints directory ``path``."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    found = CheckpointManager.reading(path).latest()
    if found is None:
        raise CheckpointError(f"{path}: not a checkpoint (no meta.json) nor a directory of checkpoints")
    return found


def inspect_checkpoint(path: str) -> dict:
    """What a checkpoint holds, read from its headers (no tensor is loaded):
    {path, step, tables: {name: rows, dim, slot_width, bytes[, namespaces:
    {name: rows}]}, dense: {name:
    (shape, values)}, parts: JSON parts (optimizers, scheduler, dataset)}.
    ``path``: a ``ckpt-N`` directory, or a checkpoints directory (its latest)."""
    from safetensors import safe_open

    path = resolve_checkpoint(path)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)

    def shapes(file):
        out = {}
        if os.path.isfile(file):
            with safe_open(file, "pt") as st:
                for k in st.keys():
                    shape = st.get_slice(k).get_shape()
                    out[k] = (tuple(shape), int(np.prod(shape)) if shape else 1)
        return out

    tables = {}
    for name, t in meta.get("tables", {}).items():
        files = [os.path.join(path, f) for f in t.get("files", [f"table-{name}.safetensors"])]
        tables[name] = {
            "rows": t["rows"],
            "dim": t["config"]["dim"],
            "slot_width": t["slot_width"],
            "bytes": sum(os.path.getsize(f) for f in files if os.path.isfile(f)),
        }
        if "namespace_rows" in t:
            tables[name]["namespaces"] = t["namespace_rows"]
    parts = {}
    if "sparse_optimizer" in meta:
        so = meta["sparse_optimizer"]
        parts["sparse_optimizer"] = {"kind": so.get("kind"), "lr": [g.get("lr") for g in so.get("param_groups", [])]}
    for key in ("dense_optimizer", "lr_scheduler"):
        if key in meta:
            parts[key] = "saved"
    if "dataset" in meta:
        d = meta["dataset"]
        parts["dataset"] = {k: d[k] for k in ("epoch", "unit", "row", "worker_idx", "worker_num") if k in d}
    if "datasets" in meta:
        parts["datasets"] = [
            {k: d[k] for k in ("epoch", "unit", "row", "worker_idx", "worker_num") if k in d} for d in meta["datasets"]
        ]
    parts["world_size"] = meta.get("world_size", 1)
    return {
        "path": path,
        "step": meta["step"],
        "tables": tables,
        "dense": shapes(os.path.join(path, "dense.safetensors")),
        "parts": parts,
    }
