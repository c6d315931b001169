"""RaggedTensor: layout conversions, including TorchRec's jagged layout."""

import importlib.util

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis import RaggedTensor, from_keyed_jagged, to_keyed_jagged
from recis.ragged import batch_rows

ROWS = st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4), max_size=8)


def ragged(rows, weighted=False):
    values = torch.tensor([x for r in rows for x in r], dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    w = torch.arange(values.numel(), dtype=torch.float32) if weighted else None
    return RaggedTensor.from_lengths(values, lengths, w)


@given(ROWS)
def test_jagged_layout_round_trip(rows):
    rt = ragged(rows)
    values, lengths = rt.to_jagged()
    back = RaggedTensor.from_lengths(values, lengths)
    assert torch.equal(back.offsets, rt.offsets) and torch.equal(back.values, rt.values)
    assert rt.to_dense(pad=0).shape == (len(rows), max((len(r) for r in rows), default=0))


@given(ROWS, st.data())
def test_rows_of_a_batch_are_the_python_rows(rows, data):
    lo = data.draw(st.integers(0, len(rows)))
    hi = data.draw(st.integers(lo, len(rows)))
    rt = ragged(rows, weighted=True)
    part = batch_rows({"ids": rt, "label": torch.arange(len(rows))}, lo, hi)
    got = part["ids"]
    got.validate()
    assert [got.values[a:b].tolist() for a, b in zip(got.offsets[:-1], got.offsets[1:], strict=True)] == rows[lo:hi]
    flat_lo = sum(len(r) for r in rows[:lo])
    assert got.weights.tolist() == list(range(flat_lo, flat_lo + got.values.numel()))
    assert part["label"].tolist() == list(range(lo, hi))
    with pytest.raises(IndexError, match="out of range"):
        rt.rows(0, len(rows) + 1)
    with pytest.raises(TypeError, match="'name' is str"):
        batch_rows({"name": "x"}, 0, 0)


@pytest.mark.skipif(importlib.util.find_spec("torchrec") is None, reason="torchrec not installed (make bench-peers)")
def test_keyed_jagged_tensor_round_trip():
    feats = {"a": ragged([[1, 2], [], [3]], weighted=True), "b": ragged([[4], [5, 6], []], weighted=True)}
    kjt = to_keyed_jagged(feats)
    assert kjt.keys() == ["a", "b"]
    back = from_keyed_jagged(kjt)
    for k in feats:
        assert torch.equal(back[k].values, feats[k].values)
        assert torch.equal(back[k].offsets, feats[k].offsets)
        assert torch.equal(back[k].weights, feats[k].weights)
