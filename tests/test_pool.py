"""Sample-major pooling in Rust (``pool_stacked``) against torch's
``F.embedding_bag`` and autograd, and ``EmbeddingEngine.stacked``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recis import RaggedTensor, _native
from recis.nn import EmbeddingEngine, EmbeddingOption, NormalInit
from recis.nn.dynamic_embedding import pool_stacked
from recis.optim import SparseAdam


def oracle(w, inverse, offsets, weights, combiner, features):
    """torch's embedding_bag over the flat bags, then [F, B, D] -> [B, F, D]."""
    if weights is None:
        out = F.embedding_bag(inverse, w, offsets, mode=combiner, include_last_offset=True)
    else:
        out = F.embedding_bag(inverse, w, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)
        if combiner == "mean":
            lengths = offsets[1:] - offsets[:-1]
            bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            total = torch.zeros(len(lengths)).index_add_(0, bag, weights)
            out = out / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(1)
    return out.reshape(features, -1, w.shape[1]).transpose(0, 1)


@settings(max_examples=60, deadline=None)
@given(
    features=st.integers(1, 4),
    batch=st.integers(1, 6),
    rows=st.integers(1, 10),
    dim=st.integers(1, 19),
    combiner=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    data=st.data(),
)
def test_pool_stacked_matches_embedding_bag_forward_and_backward(features, batch, rows, dim, combiner, weighted, data):
    lengths = data.draw(st.lists(st.integers(0, 4), min_size=features * batch, max_size=features * batch))
    n = sum(lengths)
    inverse = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n)), dtype=torch.int64)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    weights = torch.rand(n) * 2 - 0.5 if weighted else None
    g = torch.Generator().manual_seed(n)
    w_ours = torch.randn(rows, dim, generator=g).requires_grad_(True)
    w_ref = w_ours.detach().clone().requires_grad_(True)
    ours = pool_stacked(w_ours, inverse, offsets, weights, combiner, features)
    ref = oracle(w_ref, inverse, offsets, weights, combiner, features)
    assert ours.shape == (batch, features, dim)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(batch, features, dim, generator=g)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert not w_ours.grad.is_sparse
    torch.testing.assert_close(w_ours.grad, w_ref.grad, rtol=1e-4, atol=1e-5)


def test_pool_stacked_declines_what_it_does_not_cover():
    w = torch.zeros(3, 2, dtype=torch.float64)
    inv, off = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    assert pool_stacked(w, inv, off, None, "sum", 1) is None  # float64
    learnable = torch.ones(2, requires_grad=True)
    assert pool_stacked(w.float(), inv, off, learnable, "sum", 1) is None
    assert pool_stacked(w.float(), inv, off, None, "sum", 3) is None  # 2 bags are not 3 features x B


def test_native_pool_names_a_bad_layout():
    w = np.zeros((2, 3), np.float32)
    out = np.zeros((1, 1, 3), np.float32)
    with pytest.raises(ValueError, match=r"inverse\[1\] = 7"):
        _native.pool_forward(w, np.array([0, 7]), np.array([0, 2]), None, False, 1, out)
    with pytest.raises(ValueError, match="must not decrease"):
        _native.pool_forward(
            w, np.array([0, 1]), np.array([0, 2, 1, 2]), None, False, 3, np.zeros((1, 3, 3), np.float32)
        )
    with pytest.raises(ValueError, match="out: expected 6"):
        _native.pool_forward(w, np.array([0, 1]), np.array([0, 1, 2]), None, False, 1, out)


def engine():
    init = NormalInit(0, 1)
    return EmbeddingEngine(
        {
            "a": EmbeddingOption(dim=4, initializer=init, seed=1),
            "b": EmbeddingOption(dim=4, initializer=init, seed=2),
            "c": EmbeddingOption(dim=4, initializer=init, seed=3, combiner="mean"),
        }
    )


def batch():
    return {
        "a": RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])),
        "b": RaggedTensor(torch.tensor([4, 1]), torch.tensor([0, 0, 2])),
        "c": RaggedTensor(torch.tensor([5, 6, 7]), torch.tensor([0, 1, 3])),
    }


def test_engine_stacked_equals_stacking_the_outputs_and_trains_the_same():
    e1, e2 = engine(), engine()
    o1, o2 = SparseAdam(e1, lr=0.1), SparseAdam(e2, lr=0.1)
    for _ in range(3):
        out = e1(batch())
        want = torch.stack([out[f] for f in ("a", "b", "c")], dim=1)
        got = e2.stacked(batch(), ["a", "b", "c"])
        torch.testing.assert_close(got, want)
        want.pow(2).sum().backward()
        got.pow(2).sum().backward()
        o1.step(), o2.step()
        o1.zero_grad(), o2.zero_grad()
    ids = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(e1.table("a").embeddings(ids), e2.table("a").embeddings(ids))
    # One group in the configured order: the pooled tensor itself; a subset
    # or another order: the same values.
    assert e2.stacked(batch(), ["a", "b"]).shape == (2, 2, 4)
    torch.testing.assert_close(e2.stacked(batch(), ["b", "a"])[:, 0], e2(batch())["b"])
    with pytest.raises(KeyError, match="no features"):
        e2.stacked(batch(), ["a", "zz"])
