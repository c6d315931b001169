"""`OrcDataset`: training batches from ORC files, with an exact, resumable
cursor.

The files are cut into units (one stripe each); units are shuffled (seeded,
per epoch) and sharded across workers (``worker_idx`` of ``worker_num``,
defaulting to the torch.distributed rank and world size); a pool of Rust
threads decodes units ahead of use (``prefetch`` units) and batches come out
in plan order.

A batch is a dict: a column of one value a row is a dense tensor (int64,
float32 or float64); a list column is a ``RaggedTensor``; a string column not
hashed is a ``StringColumn``. Nulls read as 0 (ints, booleans), NaN (floats),
"" (strings; hashed as ""), and [] (lists).

Files are memory-mapped while a unit is decoded: write them before training
reads them, and do not truncate or rewrite a file a reader has open (as
with any memory-mapped reader, a file that shrinks under the map ends the
process with SIGBUS).

A malformed file (corrupt, truncated, hostile: sizes it declares that do
not fit the file, a decompression bomb, a schema that loops) raises
``recis.DataError`` (a ``ValueError``) naming the file, and the stripe and
column where known. What a file may make a read allocate is bounded:
``max_stripe_rows`` rows a stripe may declare (default 2**27),
``max_stripe_bytes`` bytes its streams may inflate to (2**31),
``max_list_elements`` elements of one list column in one batch (2**27), and
``max_decoded_bytes`` bytes the requested columns of one stripe may decode
to (2**31: run-length and dictionary encodings multiply a stripe's bytes).
A reader holds at most ``prefetch + 1`` decoded stripes (the window it decodes ahead in).

``state_dict()`` is the position after the last batch handed out — epoch,
unit and row — as plain JSON-able values; a dataset that loads it resumes at
the next unread sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from recis import _native
from recis.features.strings import StringColumn
from recis.ragged import RaggedTensor

DataError = _native.DataError

NON_FINITE = ("error", "clamp", "zero")


@dataclass(frozen=True)
class Column:
    """A column to read. ``hash``: hash string values to int64 ids at read
    time (FarmHash ``Fingerprint64``, as ``recis.features.Hash``), then
    ``% bucket`` on the unsigned value when ``bucket > 0``."""

    name: str
    hash: bool = False
    bucket: int = 0


def _default_worker() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class OrcDataset(IterableDataset):
    """Batches of ``batch_size`` rows from ORC ``paths`` (files or directories
    of ``*.orc``).

    Example::

        ds = OrcDataset("data/train", batch_size=4096,
                        columns=["label", "I1", Column("C1", hash=True)])
        for batch in ds: ...
        json.dumps(ds.state_dict())   # the position, for a checkpoint
    """

    def __init__(
        self,
        paths,
        batch_size: int,
        columns,
        drop_remainder: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        num_threads: int = 2,
        prefetch: int = 4,
        worker_idx: int | None = None,
        worker_num: int | None = None,
        pin_memory: bool = False,
        device=None,
        max_stripe_rows: int = 1 << 27,
        max_stripe_bytes: int = 1 << 31,
        max_list_elements: int = 1 << 27,
        max_decoded_bytes: int = 1 << 31,
        non_finite: str = "error",
    ):
        super().__init__()
        if non_finite not in NON_FINITE:
            raise ValueError(f"OrcDataset: non_finite must be one of {list(NON_FINITE)}, got {non_finite!r}")
        self.non_finite = non_finite
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"OrcDataset: batch_size must be a positive int, got {batch_size!r}")
        if not columns:
            raise ValueError("OrcDataset: columns must name at least one column")
        self.columns = [c if isinstance(c, Column) else Column(c) for c in columns]
        names = [c.name for c in self.columns]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"OrcDataset: columns requested twice: {dup}")
        limits = (max_stripe_rows, max_stripe_bytes, max_list_elements, max_decoded_bytes)
        if not all(isinstance(x, int) and 1 <= x < 2**63 for x in limits):
            raise ValueError(
                "OrcDataset: max_stripe_rows, max_stripe_bytes, max_list_elements, max_decoded_bytes must be ints "
                f"in [1, 2**63): {limits}"
            )
        self.source = _native.OrcSource(paths, [(c.name, c.hash, c.bucket) for c in self.columns], limits)
        rank, world = _default_worker()
        self.worker_idx = rank if worker_idx is None else worker_idx
        self.worker_num = world if worker_num is None else worker_num
        if not 0 <= self.worker_idx < self.worker_num:
            raise ValueError(f"OrcDataset: worker_idx {self.worker_idx} must be in [0, worker_num={self.worker_num})")
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder
        self.shuffle = shuffle
        self.seed = seed
        self.num_threads = num_threads
        self.prefetch = prefetch
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("OrcDataset: pin_memory=True needs a CUDA device, and none is available")
        self.pin_memory = pin_memory
        self.device = None if device is None else torch.device(device)
        self.types = self.source.column_types()
        self.epoch, self.unit, self.row = 0, 0, 0

    @property
    def files(self) -> list[str]:
        return self.source.files

    def __len__(self) -> int:
        """Batches of this worker in the current epoch (from its start)."""
        rows = sum(self.source.plan_rows(self.shuffle, self.seed, self.epoch, self.worker_idx, self.worker_num))
        return rows // self.batch_size if self.drop_remainder else -(-rows // self.batch_size)

    def total_rows(self) -> int:
        """Rows of every file (all workers)."""
        return self.source.total_rows()

    def __iter__(self):
        """Batches from the current position to the end of the epoch; the
        next iteration starts the next epoch."""
        reader = self.source.reader(
            self.shuffle,
            self.seed,
            self.epoch,
            self.worker_idx,
            self.worker_num,
            self.unit,
            self.row,
            self.batch_size,
            self.drop_remainder,
            self.num_threads,
            self.prefetch,
        )
        try:
            while True:
                got = reader.next_batch()
                if got is None:
                    break
                cols, rows, (unit, row) = got
                batch = self._to_batch(cols, (self.unit, self.row))
                self.unit, self.row = unit, row
                yield batch
        finally:
            reader.close()
        self.epoch, self.unit, self.row = self.epoch + 1, 0, 0

    def _to_batch(self, cols, start: tuple[int, int]) -> dict:
        """A reader batch as tensors; ``start``: the cursor before it (to
        name where a non-finite value lies)."""
        out = {}
        for (name, dtype, _is_list, _hashed), (values, str_offsets, offsets) in zip(self.types, cols, strict=True):
            if dtype == "string":
                value = StringColumn(values, str_offsets, offsets)
            else:
                v = torch.from_numpy(values)
                if dtype != "int64":
                    v = self._finite(name, v, offsets, start)
                if offsets is None:
                    value = v
                else:
                    value = RaggedTensor(v, torch.from_numpy(offsets), validate=False)
                if self.pin_memory:
                    value = value.pin_memory()
                if self.device is not None:
                    value = value.to(self.device, non_blocking=self.pin_memory)
            out[name] = value
        return out

    def _finite(self, name: str, v: torch.Tensor, offsets, start: tuple[int, int]) -> torch.Tensor:
        """``v`` with its ±inf handled per ``non_finite``. One pass when
        there are none; NaN (a null) is left alone, which is why this tests
        ``isinf`` and not ``isfinite``."""
        inf = torch.isinf(v)
        if not bool(inf.any()):
            return v
        if self.non_finite == "zero":
            return v.masked_fill(inf, 0.0)
        if self.non_finite == "clamp":
            big = torch.finfo(v.dtype).max
            return v.clamp(-big, big)  # NaN stays NaN
        bad = inf.nonzero()[:, 0]
        at = int(bad[0])
        row = at if offsets is None else int(np.searchsorted(offsets, at, side="right")) - 1
        more = f" ({len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        where = self._locate(start, row)
        raise DataError(
            f"{where}: column {name!r}: {float(v[at])} is not a finite number{more}; "
            "OrcDataset(non_finite='clamp' or 'zero') (config: [data] non_finite) replaces such values, and a NaN "
            "reads as a null"
        )

    def _locate(self, start: tuple[int, int], batch_row: int) -> str:
        """Where row ``batch_row`` of the batch that began at cursor
        ``start`` lies: "FILE, row R" (R counted from the file's first row)."""
        plan = self.source.plan_units(self.shuffle, self.seed, self.epoch, self.worker_idx, self.worker_num)
        unit, row = start
        left = batch_row
        while unit < len(plan) and left >= plan[unit][3] - row:
            left -= plan[unit][3] - row
            unit, row = unit + 1, 0
        path, _, before, _ = plan[unit]
        return f"{path}, row {before + row + left}"

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "unit": self.unit,
            "row": self.row,
            "worker_idx": self.worker_idx,
            "worker_num": self.worker_num,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "files": list(self.files),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at ``state``'s position. Refuses a state from another
        sharding (worker_num), shuffle seed or file list: its cursor would
        point at other samples."""
        for key, mine in (
            ("worker_num", self.worker_num),
            ("worker_idx", self.worker_idx),
            ("shuffle", self.shuffle),
            ("seed", self.seed),
            ("files", list(self.files)),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"OrcDataset.load_state_dict: the state was saved with {key}={state[key]!r} but this dataset "
                    f"has {key}={mine!r}; a cursor only resumes the same sharding of the same files"
                )
        plan = self.source.plan_rows(self.shuffle, self.seed, int(state["epoch"]), self.worker_idx, self.worker_num)
        unit, row = int(state["unit"]), int(state["row"])
        if unit > len(plan) or (unit < len(plan) and row > plan[unit]):
            raise ValueError(f"OrcDataset.load_state_dict: cursor (unit {unit}, row {row}) is outside the plan")
        self.epoch, self.unit, self.row = int(state["epoch"]), unit, row
