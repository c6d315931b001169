"""`OrcDataset`: training batches from ORC files, with an exact, resumable
cursor.

The files are cut into units (one stripe each); units are shuffled (seeded,
per epoch) and sharded across workers (``worker_idx`` of ``worker_num``,
defaulting to the torch.distributed rank and world size); a pool of Rust
threads decodes units ahead of use (``prefetch`` units) and batches come out
in plan order.

With ``shuffle=True`` rows are shuffled too, across stripes and files: the
worker's (unit-shuffled) plan is cut into windows of consecutive units of at
least ``shuffle_buffer`` rows (default 2**20; the epoch's last window may hold
fewer); a window is read whole and its rows come out in an order permuted by
(seed, epoch, worker, window), batches running on from one window into the
next, so that every batch holds ``batch_size`` rows but the epoch's last. All
the columns of a row stay together (list and string columns are permuted by
row). Memory: one window, up to ``shuffle_buffer`` rows plus one stripe, of
the requested columns (2**20 rows of 40 int64 columns: 336 MB), besides the
``prefetch`` decoded stripes; the first batch of a window waits for the whole
window to be decoded (a ``prefetch`` of a window's stripes overlaps that with
the previous window, for a second window of memory). ``shuffle_buffer=0``
shuffles the units only (the behaviour before shuffle_buffer: with one stripe
a file every epoch sees the same batches). A shuffle that cannot mix rows
(``shuffle_buffer <= batch_size``) warns once.

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

``state_dict()`` is the position after the last batch handed out, as plain
JSON-able values: epoch, unit and row — without a row shuffle, row ``row`` of
unit ``unit`` of the plan; with one, ``unit`` is the first unit of the current
window and ``row`` the number of its rows already handed out, in its permuted
order — and what the cursor depends on (sharding, shuffle, seed,
shuffle_buffer, files). A dataset that loads it resumes at the next unread
sample: mid-window, the window is read again and the rows handed out are
skipped. A state from another sharding, seed, shuffle_buffer or file list is
refused, and so is a state with no shuffle_buffer (saved before it existed)
where this dataset shuffles rows.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from recis import _native
from recis.features.strings import StringColumn
from recis.ragged import RaggedTensor

DataError = _native.DataError

NON_FINITE = ("error", "clamp", "zero")
SHUFFLE_BUFFER = 1 << 20

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64's finaliser (``recis_core::hash::mix64``): a bijection on
    64-bit values."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def window_permutation(n: int, seed: int, epoch: int, worker: int, window: int) -> np.ndarray:
    """The order (int64 indices) in which a window's ``n`` rows come out: a
    function of (seed, epoch, worker, window) only. The rows are sorted by
    SplitMix64 outputs of a counter, which are distinct (a bijection of
    distinct counters), so the result does not depend on numpy's sort
    algorithm or version: a checkpoint resumes on another install."""
    s = _mix64((seed + _GOLDEN) & _MASK)
    for x in (epoch, worker, window):
        s = _mix64(s ^ (x & _MASK))
    z = np.arange(1, n + 1, dtype=np.uint64)
    z *= np.uint64(_GOLDEN)  # array arithmetic wraps modulo 2**64
    z += np.uint64(s)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return np.argsort(z).astype(np.int64, copy=False)


def window_bounds(rows, shuffle_buffer: int) -> list[int]:
    """The first unit of each window of a plan whose units hold ``rows``,
    then ``len(rows)``: consecutive units until at least ``shuffle_buffer``
    rows (the last window may hold fewer)."""
    bounds, acc = [0], 0
    for i, r in enumerate(rows):
        acc += r
        if acc >= shuffle_buffer and i + 1 < len(rows):
            bounds.append(i + 1)
            acc = 0
    if rows:
        bounds.append(len(rows))
    return bounds


# A column in a window: (values, levels), ``levels`` the offset arrays from the
# rows inward (a list of strings: row -> string, string -> byte; a string or a
# list: one; a dense column: none).


def _leveled(col) -> tuple:
    values, str_offsets, offsets = col
    return values, tuple(o for o in (offsets, str_offsets) if o is not None)


def _unleveled(col, is_string: bool) -> tuple:
    values, levels = col
    if is_string:
        return values, levels[-1], (levels[0] if len(levels) == 2 else None)
    return values, None, (levels[0] if levels else None)


def _take(col, idx: np.ndarray) -> tuple:
    """Rows ``idx`` of a column, in that order (each row whole)."""
    values, levels = col
    out = []
    for o in levels:
        starts = o[idx]
        lengths = o[idx + 1] - starts
        new = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new[1:])
        out.append(new)
        idx = np.arange(int(new[-1]), dtype=np.int64) + np.repeat(starts - new[:-1], lengths)
    return values[idx], tuple(out)


def _slice(col, a: int, b: int) -> tuple:
    """Rows ``a:b`` of a column."""
    values, levels = col
    out = []
    for o in levels:
        out.append(o[a : b + 1] - o[a])
        a, b = int(o[a]), int(o[b])
    return values[a:b], tuple(out)


def _concat(pieces: list) -> tuple:
    """The rows of ``pieces`` (columns of one kind), one after the other."""
    if len(pieces) == 1:
        return pieces[0]
    values = np.concatenate([p[0] for p in pieces])
    levels = []
    for k in range(len(pieces[0][1])):
        parts, base = [np.zeros(1, dtype=np.int64)], 0
        for p in pieces:
            o = p[1][k]
            parts.append(o[1:] + base)
            base += int(o[-1])
        levels.append(np.concatenate(parts))
    return values, tuple(levels)


@dataclass(frozen=True)
class Column:
    """A column to read. ``hash``: hash string values to int64 ids at read
    time (FarmHash ``Fingerprint64``, as ``recis.features.Hash``), then
    ``% bucket`` on the unsigned value when ``bucket > 0``. ``float32``: a
    float64 column arrives as float32 (a model's dense input), a value
    beyond float32's range handled as ±inf is (``non_finite``: an error
    naming the file and row, or clamped, or zeroed)."""

    name: str
    hash: bool = False
    bucket: int = 0
    float32: bool = False


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
        shuffle_buffer: int = SHUFFLE_BUFFER,
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
        self._narrow = {c.name for c in self.columns if c.float32}
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
        if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 0:
            raise ValueError(f"OrcDataset: shuffle_buffer must be an int >= 0 (rows), got {shuffle_buffer!r}")
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_threads = num_threads
        self.prefetch = prefetch
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("OrcDataset: pin_memory=True needs a CUDA device, and none is available")
        self.pin_memory = pin_memory
        self.device = None if device is None else torch.device(device)
        self.types = self.source.column_types()
        self.epoch, self.unit, self.row = 0, 0, 0
        if shuffle and shuffle_buffer <= batch_size:
            units = len(self.source.plan_rows(True, seed, 0, self.worker_idx, self.worker_num))
            if shuffle_buffer == 0 and units <= 1:
                why = "shuffles nothing: shuffle_buffer=0 shuffles stripes only, and there is one"
            elif shuffle_buffer == 0:
                why = "with shuffle_buffer=0 shuffles stripes only: the rows of a stripe stay together, in order"
            else:
                why = f"with shuffle_buffer={shuffle_buffer} <= batch_size={batch_size} barely mixes rows"
            warnings.warn(
                f"OrcDataset: shuffle=True {why}; a shuffle_buffer of many batches mixes rows across stripes and "
                f"files (default {SHUFFLE_BUFFER}; config: [data] shuffle_buffer)",
                stacklevel=2,
            )

    @property
    def row_shuffle(self) -> bool:
        """Whether rows are shuffled (``shuffle`` with a ``shuffle_buffer``)."""
        return self.shuffle and self.shuffle_buffer > 0

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
        if self.row_shuffle:
            yield from self._iter_windows()
        else:
            yield from self._iter_plan()
        self.epoch, self.unit, self.row = self.epoch + 1, 0, 0

    def _iter_plan(self):
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
                batch = self._to_batch(self._checked(cols, (self.unit, self.row)))
                self.unit, self.row = unit, row
                yield batch
        finally:
            reader.close()

    def _iter_windows(self):
        """The row-shuffled epoch from the cursor: windows of the plan read
        whole, each handed out in its permuted order, a batch running on into
        the next window when one ends."""
        rows = self.source.plan_rows(True, self.seed, self.epoch, self.worker_idx, self.worker_num)
        if self.unit >= len(rows):
            return
        bounds = window_bounds(rows, self.shuffle_buffer)
        w0 = bounds.index(self.unit)
        is_string = [dtype == "string" for _, dtype, _, _ in self.types]
        reader = self.source.reader(
            True,
            self.seed,
            self.epoch,
            self.worker_idx,
            self.worker_num,
            self.unit,
            0,
            self.batch_size,
            False,
            self.num_threads,
            self.prefetch,
        )
        # Rows read past the end of a window (its last reader batch ran on):
        # (columns, rows, plan cursor after them).
        carry = [None, 0, (self.unit, 0)]

        def read_window(n: int) -> list:
            """The next ``n`` rows of the plan, as one array set a column."""
            pieces, got = [[] for _ in self.types], 0
            if carry[0] is not None:
                cols, r, _ = carry
                take = min(r, n)
                for p, c in zip(pieces, cols, strict=True):
                    p.append(_slice(c, 0, take))
                carry[0] = [_slice(c, take, r) for c in cols] if take < r else None
                carry[1] = r - take
                got = take
            while got < n:
                out = reader.next_batch()
                if out is None:
                    raise DataError(f"the ORC reader ended {n - got} rows before the end of a window")
                cols, r, end = out
                cols = [_leveled(c) for c in self._checked(cols, carry[2])]
                carry[2] = end
                take = min(r, n - got)
                for p, c in zip(pieces, cols, strict=True):
                    p.append(c if take == r else _slice(c, 0, take))
                if take < r:
                    carry[0], carry[1] = [_slice(c, take, r) for c in cols], r - take
                got += take
            window = []
            for p in pieces:  # one column at a time: at most one column is held twice
                window.append(_concat(p))
                p.clear()
            return window

        bs, skip = self.batch_size, self.row
        tail, tail_rows = None, 0  # the start of a batch the previous window(s) ended in
        try:
            for w in range(w0, len(bounds) - 1):
                first, end = bounds[w], bounds[w + 1]
                n = sum(rows[first:end])
                if n == 0:
                    continue
                window = read_window(n)
                perm = window_permutation(n, self.seed, self.epoch, self.worker_idx, w)
                pos, skip = skip, 0
                while pos < n:
                    take = min(bs - tail_rows, n - pos)
                    idx = perm[pos : pos + take]
                    piece = [_take(c, idx) for c in window]
                    pos += take
                    if tail is not None:
                        piece = [_concat([a, b]) for a, b in zip(tail, piece, strict=True)]
                    if tail_rows + take < bs:  # this window ended mid-batch
                        tail, tail_rows = piece, tail_rows + take
                        break
                    tail, tail_rows = None, 0
                    self.unit, self.row = (first, pos) if pos < n else (end, 0)
                    yield self._to_batch([_unleveled(c, s) for c, s in zip(piece, is_string, strict=True)])
                del window, perm
            if tail is not None and not self.drop_remainder:
                self.unit, self.row = len(rows), 0
                yield self._to_batch([_unleveled(c, s) for c, s in zip(tail, is_string, strict=True)])
        finally:
            reader.close()

    def _checked(self, cols, start: tuple[int, int]) -> list:
        """A reader batch with its float columns' ±inf handled per
        ``non_finite``; ``start``: the plan cursor before it (to name where a
        non-finite value lies)."""
        out = []
        for (name, dtype, _is_list, _hashed), (values, str_offsets, offsets) in zip(self.types, cols, strict=True):
            if dtype in ("float32", "float64"):
                v = torch.from_numpy(values)
                if dtype == "float64" and name in self._narrow:
                    v = self._narrowed(name, v, offsets, start)
                values = self._finite(name, v, offsets, start).numpy()
            out.append((values, str_offsets, offsets))
        return out

    def _narrowed(self, name: str, v: torch.Tensor, offsets, start: tuple[int, int]) -> torch.Tensor:
        """A float64 column as float32 (``Column.float32``): a finite value
        beyond float32's range is an error naming where it lies, or, per
        ``non_finite``, clamped or zeroed."""
        big = float(torch.finfo(torch.float32).max)
        over = v.abs() > big  # NaN compares False; ±inf is _finite's
        over &= torch.isfinite(v)
        if bool(over.any()):
            if self.non_finite == "error":
                at = int(over.nonzero()[0, 0])
                row = at if offsets is None else int(np.searchsorted(offsets, at, side="right")) - 1
                raise DataError(
                    f"{self._locate(start, row)}: column {name!r}: {float(v[at])!r} is beyond float32's range (the "
                    "dense input is float32); OrcDataset(non_finite='clamp' or 'zero') (config: [data] non_finite) "
                    "replaces such values"
                )
            v = v.clamp(-big, big) if self.non_finite == "clamp" else v.masked_fill(over, 0.0)
        return v.to(torch.float32)

    def _to_batch(self, cols) -> dict:
        """Reader-form columns as tensors."""
        out = {}
        for (name, dtype, _is_list, _hashed), (values, str_offsets, offsets) in zip(self.types, cols, strict=True):
            if dtype == "string":
                value = StringColumn(values, str_offsets, offsets)
            else:
                v = torch.from_numpy(values)
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
            "shuffle_buffer": self.shuffle_buffer if self.shuffle else 0,
            "files": list(self.files),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at ``state``'s position. Refuses a state from another
        sharding (worker_num), shuffle, seed, shuffle_buffer or file list: its
        cursor would point at other samples."""
        buffer = self.shuffle_buffer if self.shuffle else 0
        for key, mine in (
            ("worker_num", self.worker_num),
            ("worker_idx", self.worker_idx),
            ("shuffle", self.shuffle),
            ("seed", self.seed),
            ("shuffle_buffer", buffer),
            ("files", list(self.files)),
        ):
            if key in state and state[key] != mine:
                note = " (0: rows not shuffled)" if key == "shuffle_buffer" else ""
                raise ValueError(
                    f"OrcDataset.load_state_dict: the state was saved with {key}={state[key]!r} but this dataset "
                    f"has {key}={mine!r}{note}; a cursor only resumes the same sharding and shuffle of the same files"
                )
        if "shuffle_buffer" not in state and buffer:
            raise ValueError(
                "OrcDataset.load_state_dict: the state has no shuffle_buffer: it was saved before rows were shuffled "
                f"(stripes only), and this dataset shuffles rows (shuffle_buffer={buffer}); its cursor resumes "
                "exactly with shuffle_buffer=0 (config: [data] shuffle_buffer = 0)"
            )
        epoch = int(state["epoch"])
        plan = self.source.plan_rows(self.shuffle, self.seed, epoch, self.worker_idx, self.worker_num)
        unit, row = int(state["unit"]), int(state["row"])
        if buffer and unit < len(plan):
            bounds = window_bounds(plan, buffer)
            if unit not in bounds or row > sum(plan[unit : bounds[bounds.index(unit) + 1]]):
                raise ValueError(
                    f"OrcDataset.load_state_dict: cursor (window at unit {unit}, row {row}) is not in the plan's "
                    "windows"
                )
        elif unit > len(plan) or (unit < len(plan) and row > plan[unit]):
            raise ValueError(f"OrcDataset.load_state_dict: cursor (unit {unit}, row {row}) is outside the plan")
        self.epoch, self.unit, self.row = epoch, unit, row
