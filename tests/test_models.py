"""The model zoo: shapes, gradients reaching dense and sparse parameters,
and each model learning the synthetic click model (held-out AUC against
scikit-learn's)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recis.models import MODELS, DCNv2
from recis.nn import EmbeddingOption
from recis.optim import SparseAdam
from recis.synthetic import SyntheticCTR

FIELDS = [f"C{i}" for i in range(1, 9)]


def make(name, **kw):
    cls = MODELS[name]
    return cls(FIELDS, num_dense=4, dim=8, **kw) if name != "dcnv2" else cls(FIELDS, num_dense=4, dim=8, rank=4)


def batch_of(data, n, rng):
    feats, dense, labels = data.batch(n, rng)
    return {**feats, "dense": dense.float()}, labels.float()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_learns_the_synthetic_click_model(name):
    torch.manual_seed(0)
    data = SyntheticCTR(num_features=len(FIELDS), num_dense=4, vocab=2000, seed=1, min_ids=1, max_ids=3)
    rng = np.random.default_rng(0)
    model = make(name)
    dense_opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sparse_opt = SparseAdam(model, lr=1e-2)
    for _ in range(200):
        batch, labels = batch_of(data, 256, rng)
        logits = model(batch)
        assert logits.shape == (256,)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters()), name
        assert all(t.pending_gradients() is not None for t in model.tables()), name
        dense_opt.step()
        sparse_opt.step()
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
    model.eval()
    with torch.no_grad():
        batch, labels = batch_of(data, 8000, rng)
        auc = roc_auc_score(labels.numpy(), model(batch).numpy())
    assert auc > 0.65, (name, auc)
    # One config: the fields are namespaces of one coalesced table, each
    # field's ids its own (collisionless).
    (table,) = model.tables()
    assert table.namespaces == list(FIELDS)
    assert sum(len(model.embedding.table(f)) for f in FIELDS) == len(table)


def test_field_options_and_bad_configs():
    opts = {f: EmbeddingOption(dim=8, combiner="mean") for f in FIELDS}
    m = DCNv2(opts, num_dense=0, dim=8, cross_layers=2)
    assert all(t.option.combiner == "mean" for t in m.tables())
    for name in MODELS:  # every model can keep a physical table per field
        apart = MODELS[name](FIELDS, num_dense=1, dim=4, coalesce=False)
        assert [t.name for t in apart.tables()] == FIELDS, name
    with pytest.raises(TypeError, match="coalesce"):
        MODELS["deepfm"](FIELDS, coalesce="no")
    with pytest.raises(ValueError, match="dim=9"):
        MODELS["deepfm"](opts, dim=8)  # DeepFM rows are dim + 1 wide
    with pytest.raises(ValueError, match="num_dense"):
        MODELS["dlrm"](FIELDS, num_dense=0)
    m = make("dlrm")
    with pytest.raises(KeyError, match="dense"):
        m({f: torch.tensor([[1]]) for f in FIELDS})
