"""DynamicEmbedding: pooling, eval, bad input, RaggedTensor."""

import pytest
import torch
import torch.nn.functional as F

from recis import RaggedTensor
from recis.nn import DynamicEmbedding, EmbeddingOption, NormalInit
from recis.optim import SparseAdagrad, SparseAdam


def emb(**kw):
    return DynamicEmbedding(EmbeddingOption(dim=4, initializer=NormalInit(0, 1), **kw))


def test_padded_dense_input_equals_ragged_input():
    e = emb()
    dense = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(e(dense), e(RaggedTensor.from_dense(dense)))


def test_weighted_mean_divides_by_total_weight():
    e = emb(combiner="mean")
    ids = torch.tensor([10, 20, 30])
    w = torch.tensor([1.0, 3.0, 2.0])
    out = e(RaggedTensor(ids, torch.tensor([0, 2, 2, 3]), w))
    rows = e.table.embeddings(ids)
    expect = torch.stack([(rows[0] * 1 + rows[1] * 3) / 4, torch.zeros(4), rows[2]])
    torch.testing.assert_close(out, expect)


def test_eval_never_inserts_and_unknown_ids_read_as_zeros():
    e = emb()
    e.eval()
    out = e(torch.tensor([[1, 2]]))
    assert len(e.table) == 0
    assert torch.count_nonzero(out) == 0
    e2 = emb(eval_missing="initial")
    e2.eval()
    torch.testing.assert_close(e2(torch.tensor([[1]])), e2.table.initial_values(torch.tensor([1])))
    assert len(e2.table) == 0


def test_no_grad_lookup_in_train_mode_does_not_insert():
    e = emb()
    with torch.no_grad():
        e(torch.tensor([[3]]))
    assert len(e.table) == 0


def test_non_finite_gradient_is_refused_and_table_unchanged():
    e = emb()
    opt = SparseAdagrad(e, lr=0.1)
    x = torch.tensor([[1, 2]])
    (e(x).sum() * float("nan")).backward()
    before = e.table.embeddings(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    torch.testing.assert_close(e.table.embeddings(torch.tensor([1, 2])), before, equal_nan=True)


def test_bad_ragged_inputs_name_the_argument():
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match=r"offsets\[-1\]=2 must equal len\(values\)=3"):
        RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="offsets must be int64"):
        RaggedTensor(torch.tensor([1]), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="weights has 1 elements but values has 2"):
        RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([1.0]))
    e = emb()
    with pytest.raises(ValueError, match="ids must be int64"):
        e(RaggedTensor(torch.tensor([1.0]), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"weights: shape \(1, 1\) does not match ids \(1, 2\)"):
        e(torch.tensor([[1, 2]]), weights=torch.ones(1, 1))
    assert len(e.table) == 0


def test_ragged_round_trips():
    dense = torch.tensor([[1, 0, 0], [2, 3, 0], [0, 0, 0]])
    rt = RaggedTensor.from_dense(dense, pad=0)
    assert rt.lengths().tolist() == [1, 2, 0]
    assert torch.equal(rt.to_dense(pad=0, length=3), dense)
    assert rt.to_dense().shape == (3, 2)


def test_sparse_and_dense_optimizers_train_a_model_together():
    torch.manual_seed(0)
    e = DynamicEmbedding(EmbeddingOption(dim=8, initializer=NormalInit(0, 0.1)))
    head = torch.nn.Linear(8, 1)
    sparse, dense = SparseAdam(e, lr=0.05), torch.optim.Adam(head.parameters(), lr=0.05)
    ids = torch.randint(0, 50, (256, 1))
    y = ((ids[:, 0] % 2) == 0).float()  # learnable: one id a sample decides the label
    losses = []
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(head(e(ids)).squeeze(1), y)
        loss.backward()
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_padding_id_drops_pads_of_dense_input():
    e = DynamicEmbedding(EmbeddingOption(dim=4, initializer=NormalInit(0, 1), padding_id=-1, combiner="mean"))
    out = e(torch.tensor([[5, -1, -1], [-1, -1, -1]]))
    torch.testing.assert_close(out[0], e.table.embeddings(torch.tensor([5]))[0])
    torch.testing.assert_close(out[1], torch.zeros(4))
    assert len(e.table) == 1  # the pad id was never inserted


def test_modules_with_one_shared_name_share_one_table():
    a = DynamicEmbedding(EmbeddingOption(dim=4, shared_name="user_ids", combiner="sum"), "a")
    b = DynamicEmbedding(EmbeddingOption(dim=4, shared_name="user_ids", combiner="mean"), "b")
    assert a.table is b.table
    a(torch.tensor([[1, 2]]))
    assert len(b.table) == 2
    opt = SparseAdam(torch.nn.ModuleList([a, b]), lr=0.1)
    assert len(opt.tables) == 1
    with pytest.raises(ValueError, match=r"differs in \['dim'\]"):
        DynamicEmbedding(EmbeddingOption(dim=8, shared_name="user_ids"), "c")
