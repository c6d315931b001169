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

Every file is checksummed (``meta.json``'s ``checksums``: the algorithm,
and each file's size and digest, per-rank files included; ``meta.json``
ends with the digest of the bytes before it), and a checkpoint is verified
before anything of it is loaded: its file names are plain names inside it,
every file it lists is present, of its size and digest, and a valid
safetensors file (``recis_core::ckpt``). A damaged checkpoint is skipped for
the newest verified one when resuming from a directory (with a warning that
names it and why), and refused when named. One written without checksums
loads with a warning that it is unverified. A checkpoint holding a NaN or
an infinity (a table row, the dense state) is marked ``suspect``; the last
good checkpoint is the newest one that is not, and pruning keeps it while
newer ones are suspect.

It is written under a temporary name, its files flushed to disk, then renamed
to ``ckpt-<step>``; the ``latest`` pointer is replaced (also by rename) only
after that, and older checkpoints beyond ``keep_last`` are removed last. A
crash at any point leaves the previous checkpoints intact; a half-written
temporary directory is ignored and cleaned up by the next save, and the
newest complete checkpoint is the latest even if the crash came before the
pointer was replaced (``tests/test_kill.py``).

The ``best`` pointer (``save(..., best=...)`` or ``mark_best``), a small JSON
file written the same way (temporary name, then rename): ``{"checkpoint":
"ckpt-<step>", "step", "metric", "value"}``, the checkpoint that scored best
on the validation data (``recis.framework.Trainer``). Pruning never removes
the checkpoint it names, whatever ``keep_last`` says. A directory without it
(checkpoints written before it existed) prunes as before.
Loading an untrusted checkpoint cannot run code: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recis import _native, distributed
from recis.nn.engine import dense_only

FORMAT = 1
LATEST = "latest"
BEST = "best"
META = "meta.json"
# meta.json's last field: the digest of the bytes before it.
_META_SUM = b', "meta_checksum": "'
# meta.json is small (configs, cursors, RNG states): a larger one is damage.
_META_MAX_BYTES = 256 << 20

log = logging.getLogger("recis.checkpoint")
_warned_unverified: set[str] = set()


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


def _write_meta(meta: dict, path: str) -> None:
    """``meta`` as JSON whose last field is the digest of the bytes before it."""
    head = json.dumps(meta)[:-1].encode()
    digest = _native.checksum_bytes(head)
    with open(path, "wb") as f:
        f.write(head + _META_SUM + digest.encode() + b'"}')
        f.flush()
        os.fsync(f.fileno())


def _read_meta(path: str) -> dict:
    """A checkpoint's meta.json, its own digest checked where it has one."""
    try:
        size = os.path.getsize(path)
        if size > _META_MAX_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, more than a meta.json can be ({_META_MAX_BYTES})")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        meta = json.loads(raw)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (byte {e.start}: not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds JSON {type(meta).__name__}, not an object of checkpoint fields")
    if "meta_checksum" in meta:
        at = raw.rfind(_META_SUM)
        if at < 0 or _native.checksum_bytes(raw[:at]) != meta["meta_checksum"]:
            raise CheckpointError(f"{path}: checksum mismatch (the file changed after it was written)")
        del meta["meta_checksum"]
    elif "checksums" in meta:
        raise CheckpointError(f"{path}: records its files' checksums but has none of its own (damaged)")
    return meta


def _plain_name(name, path: str, what: str) -> str:
    """``name`` if it is a plain file name inside the checkpoint ``path``."""
    why = None
    if not isinstance(name, str) or not name:
        why = "not a file name"
    elif "\0" in name:
        why = "contains NUL"
    elif os.path.isabs(name):
        why = "is an absolute path"
    elif "/" in name or (os.altsep and os.altsep in name) or os.sep in name:
        why = "contains '/'"
    elif ".." in name or name == ".":
        why = "contains '..'"
    if why is not None:
        raise CheckpointError(
            f"{os.path.join(path, META)}: {what} names file {name!r}, which {why}: a checkpoint's files must be "
            f"plain names inside {path}"
        )
    return name


def _checksums(directory: str, names) -> dict:
    """{name: {bytes, digest}} of files in ``directory``."""
    out = {}
    for name in names:
        file = os.path.join(directory, name)
        out[name] = {"bytes": os.path.getsize(file), "digest": _native.checksum_file(file)}
    return out


def _load_tensors(file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
        self.loaded: str | None = None  # by load: the path loaded, its meta,
        self.loaded_meta: dict | None = None
        self.skipped: list[tuple[str, str]] = []  # and the damaged ones skipped
        # Logical tables the model has and the checkpoint lacks, and the reverse.
        self.load_report: dict[str, list[str]] = {"added": [], "dropped": []}
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
        best: dict | None = None,
    ) -> str:
        """Writes ``ckpt-<step>`` atomically and points ``latest`` at it;
        with ``best`` ({metric, value}: what it scored on the validation
        data), the ``best`` pointer too, before older checkpoints are pruned
        (so that the best one is never pruned between the two).

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
            meta = self._save_dense(
                tmp, step, tables, ranks, model, dense_optimizer, sparse_optimizer, lr_scheduler, extra
            )
            if meta["suspect"]:
                log.warning(
                    "%s holds non-finite values, marked suspect (the last good checkpoint is %s): %s",
                    final,
                    self.last_good() or "none",
                    "; ".join(meta["suspect"]),
                )
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._point_latest(os.path.basename(final))
            if best is not None:
                self._point_best(os.path.basename(final), step, best)
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
        info: dict = {"tables": {}, "suspect": []}
        for name, table in tables.items():
            # In chunks of rows: a huge table is never held twice in memory.
            saved = table.save(tmp, f"table-{name}{tag}", chunk_rows=self.table_chunk_rows)
            info["tables"][name] = {"rows": len(table), "files": saved.files}
            if saved.nonfinite_rows:
                info["suspect"].append(
                    f"table {name!r}: {saved.nonfinite_rows} row(s) with a NaN or an infinity (e.g. id "
                    f"{saved.nonfinite_id}{f', rank {rank}' if n > 1 else ''})"
                )
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
        written = [f for t in info["tables"].values() for f in t["files"]] + [info["rng_file"]]
        info["checksums"] = _checksums(tmp, written)
        if n > 1:
            _write_json(info, os.path.join(tmp, f"rank-{rank}.json"))
        return info

    def _save_dense(self, tmp, step, tables, ranks, model, dense_optimizer, sparse_optimizer, lr_scheduler, extra):
        meta: dict = {"format": FORMAT, "step": step, "world_size": len(ranks), "tables": {}, "extra": extra or {}}
        suspect = [why for r in ranks for why in r["suspect"]]
        sums = {name: entry for r in ranks for name, entry in r["checksums"].items()}
        if len(ranks) > 1:
            sums.update(_checksums(tmp, [f"rank-{r}.json" for r in range(len(ranks))]))
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
            with dense_only():
                state = model.state_dict()
            _save_tensors(state, os.path.join(tmp, "dense.safetensors"))
            meta["dense_keys"] = sorted(state)
            sums.update(_checksums(tmp, ["dense.safetensors"]))
            suspect += [f"dense.safetensors: {k} holds a NaN or an infinity" for k in _nonfinite(state)]
        if dense_optimizer is not None:
            tensors, plain = _split_optimizer_state(dense_optimizer.state_dict())
            _save_tensors(tensors, os.path.join(tmp, "dense_optimizer.safetensors"))
            plain["class"] = type(dense_optimizer).__name__
            meta["dense_optimizer"] = plain
            sums.update(_checksums(tmp, ["dense_optimizer.safetensors"]))
            suspect += [f"dense_optimizer.safetensors: {k} holds a NaN or an infinity" for k in _nonfinite(tensors)]
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
        meta["suspect"] = suspect
        meta["checksums"] = {"algorithm": _native.checksum_algorithm(), "files": sums}
        _write_meta(meta, os.path.join(tmp, META))
        return meta

    def _point_latest(self, name: str) -> None:
        tmp = os.path.join(self.directory, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, LATEST))
        _fsync_dir(self.directory)

    def _point_best(self, name: str, step: int, best: dict) -> None:
        tmp = os.path.join(self.directory, f".{BEST}.tmp")
        _write_json(
            {"checkpoint": name, "step": step, "metric": best["metric"], "value": best["value"]},
            tmp,
        )
        os.replace(tmp, os.path.join(self.directory, BEST))
        _fsync_dir(self.directory)

    def mark_best(self, path: str, metric: str, value: float) -> None:
        """Points ``best`` at the existing checkpoint ``path`` (of this
        directory), which scored ``value`` of ``metric`` on the validation
        data. Rank 0 writes it (the other ranks return)."""
        if distributed.rank() != 0:
            return
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(self.directory):
            raise CheckpointError(f"{path}: not a checkpoint of {self.directory}")
        if not os.path.isfile(os.path.join(path, META)):
            raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
        self._point_best(os.path.basename(path), _step(path), {"metric": metric, "value": value})

    def clear_best(self) -> None:
        """Removes the ``best`` pointer (rank 0), e.g. when the checkpoint it
        names was set aside."""
        if distributed.rank() == 0:
            try:
                os.remove(os.path.join(self.directory, BEST))
            except FileNotFoundError:
                pass

    def best_info(self) -> dict | None:
        """The ``best`` pointer's record ({checkpoint, step, metric,
        value}, ``checkpoint`` made a path), or None when there is none, it
        is unreadable, or the checkpoint it names is not complete here."""
        return read_best(self.directory)

    def best(self) -> str | None:
        """The checkpoint the ``best`` pointer names (None: see ``best_info``)."""
        info = self.best_info()
        return info["checkpoint"] if info else None

    def _clean_temporaries(self) -> None:
        for entry in os.listdir(self.directory):
            if entry.startswith(".tmp-ckpt-"):
                shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)

    def checkpoints(self, complete: bool = True) -> list[str]:
        """``ckpt-<step>`` directories, oldest first: with ``complete``, only
        those with a meta.json (the others are damaged: the crash protocol
        never leaves one)."""
        found = []
        for entry in os.listdir(self.directory):
            if not entry.startswith("ckpt-"):
                continue
            if complete and not os.path.isfile(os.path.join(self.directory, entry, META)):
                continue
            if not os.path.isdir(os.path.join(self.directory, entry)):
                continue
            try:
                found.append((int(entry[5:]), entry))
            except ValueError:
                continue
        return [os.path.join(self.directory, e) for _, e in sorted(found)]

    def _prune(self) -> None:
        # Renamed away first: a crash mid-delete leaves a temporary, never a
        # checkpoint with some of its files gone.
        found = self.checkpoints()
        doomed = found[: -self.keep_last]
        if doomed and any(suspect(p) for p in found[-self.keep_last :]):
            good = self.last_good()  # kept while newer ones are suspect
            doomed = [p for p in doomed if p != good]
        best = self.best()  # kept whatever keep_last says
        doomed = [p for p in doomed if p != best]
        for path in doomed:
            gone = os.path.join(self.directory, f".tmp-ckpt-pruned-{os.path.basename(path)}")
            os.rename(path, gone)
            shutil.rmtree(gone, ignore_errors=True)

    def latest(self) -> str | None:
        """The newest complete checkpoint. The ``latest`` pointer names it
        too, except after a crash between a checkpoint's rename and the
        pointer's update; the complete directory is the truth then."""
        found = self.checkpoints()
        return found[-1] if found else None

    def last_good(self) -> str | None:
        """The newest complete checkpoint not marked suspect (one holding a
        NaN or an infinity)."""
        for path in reversed(self.checkpoints()):
            if not suspect(path):
                return path
        return None

    def last_good_note(self) -> str:
        """ "the last good checkpoint is ...", and which newer ones are
        suspect, for the message of a run that stops on a non-finite value."""
        good, saved = self.last_good(), self.checkpoints()
        none = "none (every checkpoint holds non-finite values)" if saved else "none (none was saved)"
        note = f"the last good checkpoint is {good or none}"
        newer = [p for p in saved if good is None or _step(p) > _step(good)]
        if newer:
            names = ", ".join(os.path.basename(p) for p in newer)
            why = suspect(newer[0])
            note += (
                f"; the newer {names} hold non-finite values ({why[0] if why else 'unreadable'}): set them aside to "
                "resume from it"
            )
        return note

    def set_aside(self, paths: list[str], kind: str = "damaged") -> list[str]:
        """Renames damaged checkpoints to ``ckpt-<step>.damaged`` (or
        ``.<kind>``: kept for a look, never listed, loaded nor pruned), so
        that a run resumed from an older one can save those steps again.
        Returns the new names."""
        moved = []
        for path in paths:
            target, k = f"{path}.{kind}", 1
            while os.path.exists(target):
                k += 1
                target = f"{path}.{kind}-{k}"
            os.rename(path, target)
            moved.append(target)
        if moved:
            _fsync_dir(self.directory)
        return moved

    def newest_verified(self, skip_suspect: bool = False) -> tuple[str | None, dict | None, list[tuple[str, str]]]:
        """The newest checkpoint that verifies (``verify_checkpoint``), its
        meta, and the newer ones skipped as damaged, each with the reason (a
        warning names each). With ``skip_suspect``, the newest that is also
        not suspect (a NaN or an infinity saved); the suspect ones skipped
        are listed too, their reason starting with "suspect". Under torchrun
        every rank verifies and they agree: one damaged on any rank is
        skipped on all."""
        skipped = []
        for path in reversed(self.checkpoints(complete=False)):
            try:
                meta, why = verify_checkpoint(path, share=_share()), None
            except CheckpointError as e:
                meta, why = None, str(e)
            if distributed.all_true(why is None):
                if skip_suspect and meta.get("suspect"):
                    why = f"suspect: {meta['suspect'][0]}"
                    log.warning("skipping the suspect checkpoint %s: %s", path, why)
                    skipped.append((path, why))
                    continue
                return path, meta, skipped
            why = why or "damaged: a file another rank digested does not verify"
            log.warning("skipping the damaged checkpoint %s: %s", path, why)
            skipped.append((path, why))
        return None, None, skipped

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
        m.loaded, m.loaded_meta, m.skipped, m.load_report = None, None, [], {"added": [], "dropped": []}
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
        skip_suspect: bool = False,
    ) -> int:
        """Restores what is given from ``path`` and returns its step.
        ``path`` None: the newest checkpoint that verifies, the newer
        damaged ones skipped with a warning (``newest_verified``; they are in
        ``self.skipped`` after, the path loaded and its meta in
        ``self.loaded`` and ``self.loaded_meta``); with ``skip_suspect``,
        the newer suspect ones are skipped too (``newest_verified``); a
        ``path`` given that does not verify is refused. ``parts`` selects
        what to restore (warm start: e.g. ``("sparse", "dense")``; without
        "optimizer", tables keep the saved embeddings and start their
        optimizer slots afresh). Everything is checked before anything is
        changed: the checkpoint's files (``verify_checkpoint``), and that it
        is of this model, table set and optimizers."""
        if path is None:
            path, meta, self.skipped = self.newest_verified(skip_suspect)
            if path is None:
                if self.skipped and all(why.startswith("suspect") for _, why in self.skipped):
                    raise CheckpointError(
                        f"{self.directory}: every checkpoint holds non-finite values ("
                        + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in self.skipped)
                        + "): resuming from one would meet them again; load one explicitly to look, "
                        "or train afresh in another output_dir (nothing was changed)"
                    )
                if self.skipped:
                    raise CheckpointError(
                        f"{self.directory}: no checkpoint verifies ("
                        + "; ".join(why for _, why in self.skipped)
                        + "): set the damaged ones aside, or train afresh in another output_dir"
                    )
                raise CheckpointError(f"{self.directory}: no checkpoint")
        else:
            self.skipped = []
            try:
                meta, why = verify_checkpoint(path, share=_share()), None
            except CheckpointError as e:
                meta, why = None, e
            if not distributed.all_true(why is None):
                raise why or CheckpointError(f"{path}: damaged: a file another rank digested does not verify")
        self.loaded, self.loaded_meta = path, meta
        meta_path = os.path.join(path, META)
        tables = dict(tables or {})
        rank, n = distributed.rank(), distributed.world()
        saved_world = int(meta.get("world_size", 1))
        if saved_world != n and ({"data", "rng"} & set(parts)):
            raise CheckpointError(
                f"{path}: was saved by {saved_world} ranks and this run has {n}: the readers' cursors and RNG "
                "states are per rank, so it cannot resume exactly here; load it with "
                "parts=('sparse', 'dense', 'optimizer') (tables are re-sharded to any world size)"
            )
        plan = None
        if "sparse" in parts:
            plan = _table_plan(path, meta, tables, "optimizer" in parts, sparse_optimizer)
        if "optimizer" in parts and dense_optimizer is not None and "dense_optimizer" in meta:
            _check_dense_optimizer(meta_path, meta["dense_optimizer"], dense_optimizer)
        dense_state, moved_columns = None, {}
        if "dense" in parts and model is not None:
            dense_file = os.path.join(path, "dense.safetensors")
            if not os.path.isfile(dense_file):
                raise CheckpointError(f"{path}: has no dense model")
            saved_features = _check_feature_order(path, meta, model)
            dense_state = _load_tensors(dense_file)
            if saved_features is not None:
                # Features added, removed or reordered, and the model can
                # move its dense weights' columns: resume with them moved.
                try:
                    before = dense_state
                    dense_state, moved = getattr(model, "module", model).remap_dense(dense_state, saved_features)
                    moved_columns = {k: (cols, before[k].shape[-1]) for k, cols in moved.items()}
                except (KeyError, IndexError, RuntimeError) as e:
                    raise CheckpointError(f"{dense_file}: cannot move its columns to the model's features ({e})") from e
                if rank == 0:
                    log.warning(
                        "%s: its dense layers were trained on the features %s; moved to the model's %s (added "
                        "features' weights start at zero)",
                        path,
                        saved_features,
                        [f for f, _ in model_spec_features(model)],
                    )
            with dense_only():
                mine_state = model.state_dict()
            mine = set(mine_state)
            if set(dense_state) != mine:
                missing, unexpected = sorted(mine - set(dense_state)), sorted(set(dense_state) - mine)
                raise CheckpointError(
                    f"{dense_file}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
                    + _DENSE_HINT
                )
            for k, v in mine_state.items():
                if dense_state[k].shape != v.shape:
                    raise CheckpointError(
                        f"{dense_file}: {k} has shape {tuple(dense_state[k].shape)}, the model's is {tuple(v.shape)}"
                        + _DENSE_HINT
                    )
        # Checked: now restore.
        if plan is not None:
            self.load_report = {"added": plan.added, "dropped": plan.dropped}
            if plan.dropped and rank == 0:
                log.warning("%s: tables %s are not in the model: their rows are dropped", path, ", ".join(plan.dropped))
            if plan.added and rank == 0:
                log.warning("%s: holds no tables %s: they start fresh", path, ", ".join(plan.added))
            for name, table in tables.items():
                sources = plan.sources[name]
                if not sources:
                    table.native.clear()
                    table.step = 0
                    continue
                for k, (saved_name, ns_map, same_layout) in enumerate(sources):
                    saved_table = meta["tables"][saved_name]
                    files = saved_table.get("files")
                    try:
                        if files is None:  # a checkpoint of one file a table
                            state = _load_tensors(os.path.join(path, f"table-{saved_name}.safetensors"))
                            if ns_map is not None:
                                state = table._renumber(state, ns_map, path)
                            if not same_layout:
                                state.pop("admission_counters", None)
                            if k == 0:
                                table.load_state_dict(state, embeddings_only="optimizer" not in parts)
                            else:
                                table._import(state, "optimizer" not in parts, clear=False, first=True)
                            continue
                        shards = saved_table.get("shards", [files])
                        common = dict(
                            embeddings_only="optimizer" not in parts,
                            namespaces=ns_map,
                            clear=k == 0,
                            admission=same_layout,
                        )
                        if len(shards) == n:  # the same sharding: this rank's files
                            table.load(path, shards[rank], **common)
                        else:  # re-sharded: the ids this rank owns, from every file
                            table.load(
                                path,
                                [f for fs in shards for f in fs],
                                keep=(lambda ids: distributed.owner_of(ids, n) == rank) if n > 1 else None,
                                merged=len(shards),
                                **common,
                            )
                    except ValueError as e:  # the message names the table and the file
                        raise CheckpointError(str(e)) from None
        if dense_state is not None:
            model.load_state_dict(dense_state)
        if "optimizer" in parts:
            if dense_optimizer is not None and "dense_optimizer" in meta:
                opt_file = os.path.join(path, "dense_optimizer.safetensors")
                tensors = _load_tensors(opt_file)
                plain = {k: v for k, v in meta["dense_optimizer"].items() if k != "class"}
                joined = _join_optimizer_state(tensors, plain)
                if moved_columns:
                    _move_optimizer_columns(joined, dense_optimizer, model, moved_columns)
                try:
                    dense_optimizer.load_state_dict(joined)
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{opt_file}: does not fit this dense optimizer ({e!r})") from None
            if sparse_optimizer is not None and "sparse_optimizer" in meta:
                renamed = plan.renamed if plan is not None else None
                try:
                    sparse_optimizer.load_state_dict(meta["sparse_optimizer"], renamed=renamed)
                except ValueError as e:
                    raise CheckpointError(f"{meta_path}: {e}") from None
            if lr_scheduler is not None and "lr_scheduler" in meta:
                lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if "data" in parts and dataset is not None:
            if "datasets" in meta:
                dataset.load_state_dict(meta["datasets"][rank])
            elif "dataset" in meta:
                dataset.load_state_dict(meta["dataset"])
        if "rng" in parts:
            rng = meta["rng_ranks"][rank] if "rng_ranks" in meta else {"file": "rng.safetensors", **meta["rng"]}
            torch.set_rng_state(_load_tensors(os.path.join(path, rng["file"]))["torch_cpu"])
            s = rng["numpy"]
            np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
            p = rng["python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
        return int(meta["step"])


_DENSE_HINT = (
    "; a feature added or removed changes the dense layers' inputs: warm-start the tables alone "
    '(warm_start_parts = ["sparse"]) into a new output_dir'
)


def model_spec_features(model) -> list:
    from recis.models import model_spec

    spec = model_spec(getattr(model, "module", model))
    return spec["features"] if spec else []


def _move_optimizer_columns(state: dict, optimizer, model, moved: dict[str, tuple[list[int], int]]) -> None:
    """The dense optimizer's saved state (moments) of the weights whose
    columns ``remap_dense`` moved, moved alike (new columns start at zero)."""
    from recis.models.common import remap_columns

    named = dict(getattr(model, "module", model).named_parameters())
    ids = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for key, (columns, old_width) in moved.items():
        pid = ids.get(id(named.get(key)))
        entry = state["state"].get(pid) if pid is not None else None
        for k, v in (entry or {}).items():
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[-1] == old_width:
                entry[k] = remap_columns(v, columns)


def _check_feature_order(path: str, meta: dict, model) -> list[str] | None:
    """A zoo model's dense layers take its features' embeddings in order:
    dense weights trained on other features, or on the same in another
    order, would fit by shape and mean something else. A model that can
    move its weights' columns (``remap_dense``: DeepFM, WideDeep) gets the
    saved feature list back to do so (None: the same features); any other
    is refused, naming both lists (checkpoints record the model's spec since
    serving exports)."""
    from recis.models import model_spec

    saved = ((meta.get("extra") or {}).get("model_spec") or {}).get("features")
    spec = model_spec(getattr(model, "module", model))
    if saved is None or spec is None:
        return None
    theirs, mine = [f for f, _ in saved], [f for f, _ in spec["features"]]
    if theirs != mine and hasattr(getattr(model, "module", model), "remap_dense"):
        return theirs
    if theirs != mine:
        raise CheckpointError(
            f"{path}: its dense layers were trained on the features {theirs}, in that order, and the model has "
            f"{mine}: they would read other inputs{_DENSE_HINT}"
        )


class _TablePlan:
    """Where each of the model's physical tables finds its rows in a
    checkpoint, logical table by logical table (see ``_table_plan``)."""

    def __init__(self):
        self.sources: dict[str, list[tuple[str, dict[int, int] | None, bool]]] = {}
        self.added: list[str] = []
        self.dropped: list[str] = []
        self.renamed: dict[str, list[str]] = {}  # a model table -> the saved tables its rows come from


def _saved_logical(meta: dict) -> dict[str, tuple[str, int]]:
    """{logical table: (saved physical table, its namespace index there)}."""
    out = {}
    for saved_name, t in meta["tables"].items():
        nss = [n for n, _ in (t.get("config") or {}).get("namespaces", [])]
        for k, logical in enumerate(nss or [saved_name]):
            out[logical] = (saved_name, k)
    return out


def _table_plan(path: str, meta: dict, tables: dict, with_optimizer: bool, sparse_optimizer) -> _TablePlan:
    """Matches the model's tables to the checkpoint's by logical table (a
    feature's, or a shared name's), whatever physical table either side
    holds it in: added tables start fresh, removed ones are dropped (both
    reported), reordered or re-coalesced ones load, and admission,
    eviction, initializer or seed changes are runtime policy and load. A
    changed dim is refused, and with ``with_optimizer`` a changed number of
    optimizer slot values, each naming the table and both values."""
    saved = _saved_logical(meta)
    plan = _TablePlan()
    mine = [(logical, name, k) for name, t in tables.items() for k, logical in enumerate(t.namespaces)]
    for logical, name, _k in mine:
        if logical not in saved:
            plan.added.append(logical)
            continue
        saved_name, _ = saved[logical]
        entry, table = meta["tables"][saved_name], tables[name]
        dim = (entry.get("config") or {}).get("dim")
        if dim != table.dim:
            raise CheckpointError(
                f"{path}: table {logical!r} was saved with dim {dim}, the model's has dim {table.dim}: a changed "
                "dim cannot load (give the table another name to start it afresh)"
            )
        width = entry.get("slot_width")
        if with_optimizer and width != table.native.slot_width:
            saved_kind = (meta.get("sparse_optimizer") or {}).get("kind", "?")
            kind = getattr(sparse_optimizer, "kind", "?")
            raise CheckpointError(
                f"{path}: table {logical!r} was saved by a {saved_kind!r} sparse optimizer ({width} slot values a "
                f"row) and this run's is {kind!r} ({table.native.slot_width}): load it without the optimizer "
                '(warm_start_parts = ["sparse", "dense"]) to start the slots afresh'
            )
    held = {logical for logical, _, _ in mine}
    plan.dropped = sorted(logical for logical in saved if logical not in held)
    if mine and saved and len(plan.added) == len(mine):
        raise CheckpointError(
            f"{path}: holds tables {sorted(saved)} but the model has {sorted(held)}, none of them: "
            "a checkpoint of another model?"
        )
    for name, table in tables.items():
        by_source: dict[str, dict[int, int]] = {}
        for k, logical in enumerate(table.namespaces):
            if logical in saved:
                saved_name, theirs = saved[logical]
                by_source.setdefault(saved_name, {})[theirs] = k
        sources = []
        for saved_name, ns_map in by_source.items():
            cfg = meta["tables"][saved_name].get("config") or {}
            saved_nss = [n for n, _ in cfg.get("namespaces", [])] or [saved_name]
            same = saved_nss == list(table.namespaces)
            # The admission sketch is keyed by namespace: it carries over only
            # to the same namespaces under the same admission policy.
            counters = same and cfg.get("admission") == table.table_config().get("admission")
            sources.append((saved_name, None if same else ns_map, counters))
        plan.sources[name] = sources
        plan.renamed[name] = list(by_source)
    return plan


def _step(path: str) -> int:
    return int(os.path.basename(path)[5:])


def read_best(directory: str) -> dict | None:
    """The ``best`` pointer of the checkpoints ``directory``: {checkpoint
    (its path), step, metric, value}, or None when there is none, it is not
    such a record, or the checkpoint it names is not complete there."""
    try:
        with open(os.path.join(directory, BEST)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("checkpoint"), str):
        return None
    name = info["checkpoint"]
    if not name.startswith("ckpt-") or "/" in name or os.sep in name or name in (".", ".."):
        return None
    path = os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, META)):
        return None
    return {**info, "checkpoint": path}


def suspect(path: str) -> list[str]:
    """Why the checkpoint ``path`` is suspect (the non-finite values it
    holds, or that its meta.json is unreadable); empty if it is not."""
    try:
        return list(_read_meta(os.path.join(path, META)).get("suspect") or [])
    except CheckpointError as e:
        return [str(e)]


_TABLE_TENSORS = ("ids", "values", "frequency", "last_step")


def _listed_files(path: str, meta: dict) -> dict[str, tuple[str, tuple[str, ...] | None, bool]]:
    """The safetensors files ``meta`` lists, each a plain name inside
    ``path``: {name: (what holds it, the tensors it must have, whether only
    those)}."""
    meta_path = os.path.join(path, META)

    def malformed(field: str, want: str):
        return CheckpointError(f"{meta_path}: field {field} is not {want} (not a checkpoint of this format?)")

    if not isinstance(meta.get("step"), int):
        raise malformed("step", "an integer")
    tables = meta.get("tables")
    if not isinstance(tables, dict):
        raise malformed("tables", "an object of tables")
    files: dict = {}
    for name, t in tables.items():
        what = f"table {name!r}"
        if not isinstance(t, dict) or not isinstance(t.get("config"), dict) or not isinstance(t.get("slot_width"), int):
            raise malformed(f"tables.{name}", "an object with config and slot_width")
        names = t.get("files", [f"table-{name}.safetensors"])
        shards = t.get("shards", [])
        if not isinstance(names, list) or not isinstance(shards, list) or not all(isinstance(x, list) for x in shards):
            raise malformed(f"tables.{name}.files", "a list of file names")
        for f in [*names, *(f for fs in shards for f in fs)]:
            files[_plain_name(f, path, what)] = (what, _TABLE_TENSORS, False)
    if "dense_keys" in meta:
        keys = meta["dense_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise malformed("dense_keys", "a list of names")
        files["dense.safetensors"] = ("the dense model", tuple(keys), True)
    if "dense_optimizer" in meta:
        if not isinstance(meta["dense_optimizer"], dict):
            raise malformed("dense_optimizer", "an object")
        files["dense_optimizer.safetensors"] = ("the dense optimizer", None, False)
    if "rng_ranks" in meta:
        if not isinstance(meta["rng_ranks"], list) or not all(isinstance(r, dict) for r in meta["rng_ranks"]):
            raise malformed("rng_ranks", "a list of objects")
        for r in meta["rng_ranks"]:
            files[_plain_name(r.get("file"), path, "rng_ranks")] = ("the RNG state", ("torch_cpu",), False)
    elif "rng" in meta:
        files["rng.safetensors"] = ("the RNG state", ("torch_cpu",), False)
    return files


def _share() -> tuple[int, int] | None:
    """Under torchrun, (rank, world): the ranks digest a checkpoint's files
    between them (each file once, by one rank) and agree on the verdict
    (``distributed.all_true``), so that a checkpoint is read once in all,
    not once a rank."""
    return (distributed.rank(), distributed.world()) if distributed.active() else None


def verify_checkpoint(path: str, share: tuple[int, int] | None = None) -> dict:
    """Checks the checkpoint ``path`` and returns its meta; a
    ``CheckpointError`` names the file and what is wrong. Checked: meta.json
    (valid JSON, its own digest, its fields); every file it lists is a plain
    name inside ``path``, present, of the size and digest recorded, and a
    valid safetensors file holding the tensors its part needs. A checkpoint
    written without checksums is checked but for sizes and digests, with a
    warning (once) that it is unverified. Reads every file once; loads
    nothing. ``share`` = (k, n): digest only the k-th of every n files
    (in name order; every other check still covers every file), for n
    ranks that verify one checkpoint together and combine their verdicts."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    meta = _read_meta(meta_path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT}")
    files = _listed_files(path, meta)
    sums = meta.get("checksums")
    if sums is None:
        if path not in _warned_unverified:
            _warned_unverified.add(path)
            log.warning("%s was written without checksums: its files are checked but unverified", path)
    else:
        _check_sums(path, sums, files, share)
    for name, (what, need, only) in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (meta.json lists it for {what})")
        try:
            tensors, _ = _native.check_safetensors_file(file)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a valid safetensors file: {e}") from None
        have = {t[0] for t in tensors}
        if need is not None:
            lacking = sorted(set(need) - have)
            extra = sorted(have - set(need)) if only else []
            if lacking or extra:
                odd = ", ".join(
                    x for x in (f"lacks {lacking[:5]}" * bool(lacking), f"has {extra[:5]}" * bool(extra)) if x
                )
                raise CheckpointError(
                    f"{file}: does not hold {what} of this checkpoint ({odd}): a file from elsewhere?"
                )
    return meta


def _check_sums(path: str, sums, files: dict, share: tuple[int, int] | None = None) -> None:
    meta_path = os.path.join(path, META)
    algorithm = _native.checksum_algorithm()
    if not isinstance(sums, dict) or not isinstance(sums.get("files"), dict):
        raise CheckpointError(f"{meta_path}: field checksums is not {{algorithm, files}}")
    if sums.get("algorithm") != algorithm:
        raise CheckpointError(
            f"{meta_path}: checksums by {sums.get('algorithm')!r}; this version of recis verifies {algorithm!r}"
        )
    listed = sums["files"]
    for name in files:
        if name not in listed:
            raise CheckpointError(f"{os.path.join(path, name)}: meta.json lists it but records no checksum of it")
    for i, (name, entry) in enumerate(sorted(listed.items())):
        file = os.path.join(path, _plain_name(name, path, "checksums"))
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{meta_path}: field checksums.files.{name} is not {{bytes, digest}}")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (meta.json records its checksum)")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{file}: {size} bytes where meta.json recorded {entry['bytes']} (truncated or overwritten)"
            )
        if share is not None and i % share[1] != share[0]:
            continue  # another rank digests it
        try:
            digest = _native.checksum_file(file)
        except OSError as e:
            raise CheckpointError(f"{file}: {e}") from None
        if digest != entry.get("digest"):
            raise CheckpointError(
                f"{file}: checksum mismatch ({algorithm} {digest}, meta.json recorded {entry.get('digest')}): "
                "the file changed after it was written"
            )


def _check_dense_optimizer(meta_path: str, saved: dict, optimizer) -> None:
    """The saved dense optimizer state fits ``optimizer``: the same class
    (recorded since checksums were) and parameter groups."""
    mine = type(optimizer).__name__
    if saved.get("class") not in (None, mine):
        raise CheckpointError(
            f"{meta_path}: dense_optimizer was saved by {saved['class']}, this run's is {mine}: its state cannot "
            "carry over (the same optimizer, or a warm start without 'optimizer')"
        )
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{meta_path}: field dense_optimizer.param_groups is not a list of groups")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{meta_path}: dense_optimizer has {len(groups)} parameter group(s), this run's {mine} has "
            f"{len(optimizer.param_groups)}"
        )
    for k, (theirs, ours) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        # One-sided differences are torch versions adding options; both
        # sides is another optimizer (of a checkpoint that has no class).
        only_saved, only_mine = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        if only_saved and only_mine:
            raise CheckpointError(
                f"{meta_path}: dense_optimizer group {k} has options {only_saved} and lacks {only_mine} of this "
                f"run's {mine}: saved by another optimizer"
            )
        if len(theirs.get("params", [])) != len(ours["params"]):
            raise CheckpointError(
                f"{meta_path}: dense_optimizer group {k} has {len(theirs.get('params', []))} parameters, this run's "
                f"{mine} has {len(ours['params'])}"
            )


def resolve_checkpoint(path: str) -> str:
    """``path`` if it is a checkpoint (a ``ckpt-N`` directory); the
    checkpoint it names if it is a ``best`` pointer file; else the newest
    checkpoint that verifies in the checkpoints directory ``path`` (damaged
    newer ones skipped with a warning)."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if os.path.basename(path) == BEST and os.path.isfile(path):
        info = read_best(os.path.dirname(path) or ".")
        if info is None:
            raise CheckpointError(f"{path}: names no complete checkpoint of {os.path.dirname(path) or '.'}")
        return info["checkpoint"]
    found, _, skipped = CheckpointManager.reading(path).newest_verified()
    if found is None:
        if skipped:
            raise CheckpointError(f"{path}: no checkpoint verifies (" + "; ".join(why for _, why in skipped) + ")")
        raise CheckpointError(f"{path}: not a checkpoint (no meta.json) nor a directory of checkpoints")
    return found


def inspect_checkpoint(path: str) -> dict:
    """What a checkpoint holds, read from its headers (no tensor is loaded),
    once it verifies (``verify_checkpoint``): {path, step, verified
    (checksums recorded and matched), suspect (why, or empty), tables:
    {name: rows, dim, slot_width, bytes[, namespaces: {name: rows}]}, dense:
    {name: (shape, values)}, parts: JSON parts (optimizers, scheduler,
    dataset)}. ``path``: a ``ckpt-N`` directory, or a checkpoints directory
    (its newest verified)."""
    path = resolve_checkpoint(path)
    meta = verify_checkpoint(path)

    def shapes(file):
        out = {}
        if os.path.isfile(file):
            for k, _, shape in _native.check_safetensors_file(file)[0]:
                out[k] = (tuple(shape), int(np.prod(shape)) if shape else 1)
        return dict(sorted(out.items()))

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
        "verified": "checksums" in meta,
        "suspect": list(meta.get("suspect") or []),
        "tables": tables,
        "dense": shapes(os.path.join(path, "dense.safetensors")),
        "parts": parts,
    }
