"""`RaggedTensor`: the one sparse type of RecIS.

A batch of variable-length rows stored as

- ``values``  [N] (or [N, K, ...]: each element a fixed-shape vector): the
  elements of every row, concatenated;
- ``offsets`` [B + 1] int64: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``;
  ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == N``;
- ``weights`` [N] floating, optional: one weight per value.

The batch size is ``len(offsets) - 1``; an empty row has equal neighbouring
offsets. TorchRec's ``KeyedJaggedTensor`` holds one such layout per key with
``lengths`` instead of ``offsets``: ``from_lengths`` / ``lengths()`` convert.
"""

from __future__ import annotations

import torch


class RaggedTensor:
    __slots__ = ("values", "offsets", "weights")

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        validate: bool = True,
    ):
        self.values = values
        self.offsets = offsets
        self.weights = weights
        if validate:
            self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the argument that breaks an invariant."""
        v, o, w = self.values, self.offsets, self.weights
        if not isinstance(v, torch.Tensor) or v.dim() < 1:
            raise ValueError(f"RaggedTensor: values must be a tensor of at least 1 dimension, got {_describe(v)}")
        if not isinstance(o, torch.Tensor) or o.dim() != 1:
            raise ValueError(f"RaggedTensor: offsets must be a 1-D tensor, got {_describe(o)}")
        if o.dtype != torch.int64:
            raise ValueError(f"RaggedTensor: offsets must be int64, got {o.dtype}")
        if o.numel() == 0:
            raise ValueError("RaggedTensor: offsets must hold at least one element (batch size + 1)")
        if int(o[0]) != 0:
            raise ValueError(f"RaggedTensor: offsets[0] must be 0, got {int(o[0])}")
        if o.numel() > 1:
            d = o[1:] - o[:-1]
            bad = torch.nonzero(d < 0)
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"RaggedTensor: offsets must be non-decreasing; offsets[{i}]={int(o[i])} > "
                    f"offsets[{i + 1}]={int(o[i + 1])}"
                )
        if int(o[-1]) != v.shape[0]:
            raise ValueError(f"RaggedTensor: offsets[-1]={int(o[-1])} must equal len(values)={v.shape[0]}")
        if w is not None:
            if not isinstance(w, torch.Tensor) or w.dim() != 1:
                raise ValueError(f"RaggedTensor: weights must be a 1-D tensor, got {_describe(w)}")
            if not w.is_floating_point():
                raise ValueError(f"RaggedTensor: weights must be floating point, got {w.dtype}")
            if w.numel() != v.shape[0]:
                raise ValueError(f"RaggedTensor: weights has {w.numel()} elements but values has {v.shape[0]}")

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_lengths(
        cls, values: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None = None
    ) -> RaggedTensor:
        if lengths.dim() != 1:
            raise ValueError(f"RaggedTensor.from_lengths: lengths must be 1-D, got {_describe(lengths)}")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError("RaggedTensor.from_lengths: lengths must be >= 0")
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.to(torch.int64), 0, out=offsets[1:])
        return cls(values, offsets, weights)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, pad=None, weights: torch.Tensor | None = None) -> RaggedTensor:
        """Rows of a [B, L] tensor; elements equal to ``pad`` (if given) are
        dropped, with their ``weights`` ([B, L], optional)."""
        if dense.dim() != 2:
            raise ValueError(f"RaggedTensor.from_dense: expected a [B, L] tensor, got {_describe(dense)}")
        if weights is not None and weights.shape != dense.shape:
            raise ValueError(f"RaggedTensor.from_dense: weights shape {tuple(weights.shape)} != {tuple(dense.shape)}")
        b, length = dense.shape
        if pad is None:
            offsets = torch.arange(0, (b + 1) * length, length, dtype=torch.int64, device=dense.device)
            w = None if weights is None else weights.reshape(-1)
            return cls(dense.reshape(-1), offsets, w)
        keep = dense != pad
        return cls.from_lengths(dense[keep], keep.sum(1), None if weights is None else weights[keep])

    def to_dense(self, pad=0, length: int | None = None) -> torch.Tensor:
        """[B, L] (or [B, L, K, ...]) tensor with rows left-aligned and padded
        with ``pad``; ``length`` defaults to the longest row (longer rows are cut)."""
        lens = self.lengths()
        width = int(lens.max()) if length is None and lens.numel() else (length or 0)
        shape = (self.batch_size, width, *self.values.shape[1:])
        out = torch.full(shape, pad, dtype=self.values.dtype, device=self.values.device)
        n = self.values.shape[0]
        if n and width:
            row = torch.repeat_interleave(torch.arange(self.batch_size, device=lens.device), lens)
            col = torch.arange(n, device=lens.device) - self.offsets[:-1][row]
            keep = col < width
            out[row[keep], col[keep]] = self.values[keep]
        return out

    def to_jagged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths): TorchRec's jagged layout; ``from_lengths`` is
        the way back."""
        return self.values, self.lengths()

    def to(self, device, non_blocking: bool = False) -> RaggedTensor:
        w = None if self.weights is None else self.weights.to(device, non_blocking=non_blocking)
        return RaggedTensor(
            self.values.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
            w,
            validate=False,
        )

    def pin_memory(self) -> RaggedTensor:
        w = None if self.weights is None else self.weights.pin_memory()
        return RaggedTensor(self.values.pin_memory(), self.offsets.pin_memory(), w, validate=False)

    def rows(self, lo: int, hi: int) -> RaggedTensor:
        """Rows ``lo:hi`` (0 <= lo <= hi <= batch_size), offsets from 0."""
        if not 0 <= lo <= hi <= self.batch_size:
            raise IndexError(f"RaggedTensor.rows({lo}, {hi}): out of range for {self.batch_size} rows")
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        w = None if self.weights is None else self.weights[a:b]
        return RaggedTensor(self.values[a:b], self.offsets[lo : hi + 1] - a, w, validate=False)

    def __repr__(self) -> str:
        w = "" if self.weights is None else ", weighted"
        return f"RaggedTensor(batch_size={self.batch_size}, nnz={self.values.shape[0]}, dtype={self.values.dtype}{w})"


def batch_rows(batch: dict, lo: int, hi: int) -> dict:
    """Rows ``lo:hi`` of a batch: a dict of RaggedTensors and tensors whose
    first dimension is the row (e.g. one rank's share of a global batch, or
    an empty batch shaped like another)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, RaggedTensor):
            out[k] = v.rows(lo, hi)
        elif isinstance(v, torch.Tensor):
            out[k] = v[lo:hi]
        else:
            raise TypeError(f"batch_rows: {k!r} is {type(v).__name__}, not a RaggedTensor or a tensor")
    return out


def to_keyed_jagged(features: dict[str, RaggedTensor]):
    """A TorchRec ``KeyedJaggedTensor`` holding several features (keys in dict
    order). Needs torchrec; weights are kept if every feature has them."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    parts = list(features.values())
    weighted = [p.weights is not None for p in parts]
    if any(weighted) and not all(weighted):
        raise ValueError("to_keyed_jagged: either every feature has weights or none has")
    return KeyedJaggedTensor(
        keys=list(features),
        values=torch.cat([p.values for p in parts]),
        lengths=torch.cat([p.lengths() for p in parts]),
        weights=torch.cat([p.weights for p in parts]) if parts and all(weighted) else None,
    )


def from_keyed_jagged(kjt) -> dict[str, RaggedTensor]:
    """The features of a TorchRec ``KeyedJaggedTensor`` as RaggedTensors."""
    out = {}
    for key, jt in kjt.to_dict().items():
        out[key] = RaggedTensor.from_lengths(jt.values(), jt.lengths().to(torch.int64), jt.weights_or_none())
    return out


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
