"""`StringColumn`: a batch of strings (one or several per sample) in the
layout the Rust hash kernels read: one UTF-8 byte buffer, string offsets into
it, and — for several strings per sample — row offsets into the strings."""

from __future__ import annotations

import numpy as np


class StringColumn:
    __slots__ = ("bytes", "str_offsets", "offsets")

    def __init__(self, data: np.ndarray, str_offsets: np.ndarray, offsets: np.ndarray | None = None):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"StringColumn: bytes must be a 1-D uint8 array, got {data.dtype} {data.shape}")
        if str_offsets.dtype != np.int64 or str_offsets.ndim != 1 or len(str_offsets) == 0:
            raise ValueError("StringColumn: str_offsets must be a non-empty 1-D int64 array")
        if str_offsets[0] != 0 or str_offsets[-1] != len(data) or (np.diff(str_offsets) < 0).any():
            raise ValueError("StringColumn: str_offsets must start at 0, not decrease and end at len(bytes)")
        if offsets is not None:
            if offsets.dtype != np.int64 or offsets[0] != 0 or offsets[-1] != len(str_offsets) - 1:
                raise ValueError("StringColumn: offsets must be int64, start at 0 and end at the number of strings")
            if (np.diff(offsets) < 0).any():
                raise ValueError("StringColumn: offsets must be non-decreasing")
        self.bytes = data
        self.str_offsets = str_offsets
        self.offsets = offsets

    @property
    def num_strings(self) -> int:
        return len(self.str_offsets) - 1

    @property
    def batch_size(self) -> int:
        return self.num_strings if self.offsets is None else len(self.offsets) - 1

    @classmethod
    def from_list(cls, rows) -> StringColumn:
        """From a list of str (one a sample) or of lists of str (several)."""
        ragged = any(isinstance(r, (list, tuple)) for r in rows)
        if ragged:
            flat = [s for r in rows for s in r]
            lengths = np.array([len(r) for r in rows], dtype=np.int64)
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
        else:
            flat, offsets = list(rows), None
        encoded = [s.encode() if isinstance(s, str) else bytes(s) for s in flat]
        str_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=str_offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(data, str_offsets, offsets)

    @classmethod
    def from_arrow(cls, array) -> StringColumn:
        """From a pyarrow string array or list<string> array (no copy of the
        bytes where the buffers allow; nulls read as empty strings)."""
        import pyarrow as pa

        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        offsets = None
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            offsets = array.offsets.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            array = array.flatten()
        if not (
            pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_binary(array.type)
        ):
            raise ValueError(f"StringColumn.from_arrow: expected strings, got {array.type}")
        array = array.cast(pa.large_binary())
        buffers = array.buffers()
        str_offsets = np.frombuffer(buffers[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
        data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
        start = int(str_offsets[0])
        data = data[start : int(str_offsets[-1])]
        return cls(np.ascontiguousarray(data), (str_offsets - start).astype(np.int64), offsets)

    def __repr__(self) -> str:
        return f"StringColumn(batch_size={self.batch_size}, strings={self.num_strings})"
