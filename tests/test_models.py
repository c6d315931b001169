"""The model zoo: shapes, gradients reaching dense and sparse parameters,
each model learning the synthetic click model (held-out AUC against
scikit-learn's), and dropout / batch_norm (defaults keep the layout)."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from recis.models import MODELS, SEQUENCE_MODELS, DCNv2, build_model, model_spec
from recis.nn import EmbeddingOption
from recis.nn.engine import dense_only
from recis.optim import SparseAdam
from recis.ragged import batch_rows
from recis.synthetic import SyntheticCTR

FIELDS = [f"C{i}" for i in range(1, 9)]
# The models that pool every field (the sequence models, DIN and BST, are
# tested in test_sequence_models.py).
POOLED = sorted(set(MODELS) - set(SEQUENCE_MODELS))


def make(name, **kw):
    cls = MODELS[name]
    return cls(FIELDS, num_dense=4, dim=8, **kw) if name != "dcnv2" else cls(FIELDS, num_dense=4, dim=8, rank=4)


def batch_of(data, n, rng):
    feats, dense, labels = data.batch(n, rng)
    return {**feats, "dense": dense.float()}, labels.float()


@pytest.mark.parametrize("name", POOLED)
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
    for name in POOLED:  # every model can keep a physical table per field
        apart = MODELS[name](FIELDS, num_dense=1, dim=4, coalesce=False)
        assert [t.name for t in apart.tables()] == FIELDS, name
    with pytest.raises(TypeError, match="coalesce"):
        MODELS["deepfm"](FIELDS, coalesce="no")
    # DeepFM rows are dim + 1 wide: tables 8 wide are projected (per-feature dims).
    fm = MODELS["deepfm"](opts, dim=8)
    assert {k: tuple(v.shape) for k, v in fm.project.state_dict().items()} == {
        f"proj.{f}.weight": (9, 8) for f in FIELDS
    }
    with pytest.raises(ValueError, match="num_dense"):
        MODELS["dlrm"](FIELDS, num_dense=0)
    m = make("dlrm")
    with pytest.raises(KeyError, match="dense"):
        m({f: torch.tensor([[1]]) for f in FIELDS})


# dropout and batch_norm (issue #15).

SMALL = {  # small MLPs; the other arguments keep their defaults
    "deepfm": {"hidden": (16, 8)},
    "wide_deep": {"hidden": (16, 8)},
    "dcnv2": {"hidden": (16, 8), "cross_layers": 2, "rank": 4},
    "dlrm": {"bottom": (8, 6), "top": (16, 8)},
}


def small(name, seed=0, **kw):
    torch.manual_seed(seed)
    return MODELS[name](FIELDS, num_dense=4, dim=8, **SMALL[name], **kw)


def dense_state(model):
    with dense_only():
        return model.state_dict()


def expected_dense_keys(name, **kw):
    """The dense state_dict names of a model built with ``kw`` (the rest
    its constructor's defaults), in the layout before dropout and
    batch_norm: each MLP a Sequential of Linear, ReLU pairs (Linears at even
    indices) then its output Linear."""
    args = {k: p.default for k, p in inspect.signature(MODELS[name]).parameters.items()}
    args.update(kw)

    def mlp(prefix, hidden):  # hidden layers, then the output layer
        return [f"{prefix}.{2 * i}.{p}" for i in range(len(hidden) + 1) for p in ("weight", "bias")]

    linear = lambda prefix: [f"{prefix}.weight", f"{prefix}.bias"]  # noqa: E731
    if name == "deepfm":
        return (linear("dense_linear") if args["num_dense"] else []) + mlp("mlp", args["hidden"])
    if name == "wide_deep":
        return (linear("wide_dense") if args["num_dense"] else []) + mlp("deep", args["hidden"])
    if name == "dcnv2":
        cross = []
        for i in range(args["cross_layers"]):
            p = f"cross.{i}.w"
            cross += linear(p) if args["rank"] is None else [f"{p}.0.weight", *linear(f"{p}.1")]
        return cross + mlp("deep", args["hidden"])
    assert name == "dlrm"
    return mlp("bottom", args["bottom"]) + mlp("top", args["top"])


@pytest.mark.parametrize("name", POOLED)
def test_defaults_keep_the_layout_and_names_checkpoints_hold(name):
    kw = dict(num_dense=4, dim=8, **SMALL[name])
    model = small(name)
    assert list(dense_state(model)) == expected_dense_keys(name, **kw)
    # Only Linear and ReLU in the MLPs: no Dropout(0), no BatchNorm.
    kinds = {type(m) for m in model.modules() if not isinstance(m, (nn.Sequential, nn.ModuleList))}
    assert not kinds & {nn.Dropout, nn.BatchNorm1d}, kinds
    # The defaults spelled out build the same model, bit for bit.
    same = small(name, dropout=0.0, batch_norm=False)
    assert list(dense_state(same)) == list(dense_state(model))
    assert all(torch.equal(v, dense_state(same)[k]) for k, v in dense_state(model).items())
    model.load_state_dict(dense_state(same), strict=False)  # dense names fit (tables are the engine's)
    # batch_norm adds BatchNorm1d parameters and statistics only, and the
    # Linears are the same draws (a BatchNorm1d or Dropout draws nothing).
    normed = small(name, batch_norm=True, dropout=0.3)
    norms = [n for n, m in normed.named_modules() if isinstance(m, nn.BatchNorm1d)]
    extra = [k for k in dense_state(normed) if k.rsplit(".", 1)[0] in norms]
    assert norms and len(extra) == 5 * len(norms)  # weight, bias, running_mean, running_var, num_batches_tracked
    assert len(dense_state(normed)) == len(dense_state(model)) + len(extra)
    linears = lambda m: [x for x in m.modules() if isinstance(x, nn.Linear)]  # noqa: E731
    assert len(linears(normed)) == len(linears(model))
    for a, b in zip(linears(normed), linears(model), strict=True):
        assert torch.equal(a.weight, b.weight) and (a.bias is None) == (b.bias is None)


def regularized_modules(model):
    """(kind, size) of the model's Dropouts and BatchNorm1ds, in order."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            out.append(("dropout", m.p))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("batch_norm", m.num_features))
    return out


@pytest.mark.parametrize("name", POOLED)
def test_dropout_and_batch_norm_in_every_hidden_layer_only(name):
    model = small(name, dropout=0.25, batch_norm=True)
    mlps = [model.bottom, model.top] if name == "dlrm" else [getattr(model, "mlp", None) or model.deep]
    hidden = [SMALL[name]["bottom"], SMALL[name]["top"]] if name == "dlrm" else [SMALL[name]["hidden"]]
    width = lambda m: getattr(m, "out_features", getattr(m, "num_features", None))  # noqa: E731
    for seq, widths in zip(mlps, hidden, strict=True):
        got = [(type(m), width(m)) for m in seq]
        want = [x for h in widths for x in [(nn.Linear, h), (nn.BatchNorm1d, h), (nn.ReLU, None), (nn.Dropout, None)]]
        assert got[: len(want)] == want, (name, got)
        tail = got[len(want) :]  # the output layer (DLRM's bottom: then its ReLU), neither normed nor dropped
        assert tail[0][0] is nn.Linear and {k for k, _ in tail} <= {nn.Linear, nn.ReLU}, (name, tail)
    assert all(p == 0.25 for k, p in regularized_modules(model) if k == "dropout")
    only_dropout = regularized_modules(small(name, dropout=0.25))
    assert only_dropout and {k for k, _ in only_dropout} == {"dropout"}
    only_bn = regularized_modules(small(name, batch_norm=True))
    assert only_bn and {k for k, _ in only_bn} == {"batch_norm"}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dropout": -0.1}, "dropout must be a number in \\[0, 1\\), got -0.1"),
        ({"dropout": 1.0}, "dropout must be a number in \\[0, 1\\), got 1.0"),
        ({"dropout": 1.5}, "dropout must be a number in \\[0, 1\\), got 1.5"),
        ({"dropout": math.nan}, "dropout must be a number in \\[0, 1\\), got nan"),
        ({"dropout": "0.1"}, "dropout must be a number in \\[0, 1\\), got '0.1'"),
        ({"dropout": True}, "dropout must be a number in \\[0, 1\\), got True"),
        ({"dropout": None}, "dropout must be a number in \\[0, 1\\), got None"),
        ({"batch_norm": "yes"}, "batch_norm must be a bool, got 'yes'"),
        ({"batch_norm": 1}, "batch_norm must be a bool, got 1"),
        ({"batch_norm": None}, "batch_norm must be a bool, got None"),
    ],
)
@pytest.mark.parametrize("name", POOLED)
def test_bad_dropout_or_batch_norm_is_named(name, kw, message):
    with pytest.raises(ValueError, match=f"{type(small(name)).__name__}: {message}"):
        small(name, **kw)


@pytest.mark.parametrize("name", POOLED)
def test_spec_records_dropout_and_batch_norm_and_rebuilds_the_layers(name):
    assert {k: model_spec(small(name))["args"][k] for k in ("dropout", "batch_norm")} == {
        "dropout": 0.0,
        "batch_norm": False,
    }
    model = small(name, dropout=0.2, batch_norm=True)
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec["args"]["dropout"] == 0.2 and spec["args"]["batch_norm"] is True
    rebuilt = build_model(spec)
    layers = lambda m: [(n, type(x).__name__, repr(x)) for n, x in m.named_modules() if n]  # noqa: E731
    assert layers(rebuilt) == layers(model)
    mine, theirs = dense_state(model), dense_state(rebuilt)
    assert [(k, v.shape, v.dtype) for k, v in mine.items()] == [(k, v.shape, v.dtype) for k, v in theirs.items()]
    rebuilt.load_state_dict(mine, strict=False)


def fixed_batch(n=256, seed=0):
    data = SyntheticCTR(num_features=len(FIELDS), num_dense=4, vocab=500, seed=1, min_ids=1, max_ids=3)
    return batch_of(data, n, np.random.default_rng(seed))


@pytest.mark.parametrize("name", POOLED)
def test_evaluation_turns_dropout_off_and_uses_the_running_statistics(name):
    batch, _ = fixed_batch(64)
    model = small(name, dropout=0.5, batch_norm=True)
    model.train()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    assert not torch.equal(a, b)  # dropout draws differ between training passes
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(int(m.num_batches_tracked) == 2 for m in bn)
    stats = [m.running_mean.clone() for m in bn]
    model.eval()
    with torch.no_grad():
        c, d = model(batch), model(batch)
        one = model(batch_rows(batch, 0, 1))  # a row's score does not depend on its batch
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    torch.testing.assert_close(one, c[:1], rtol=1e-6, atol=1e-6)
    # Evaluation updates no statistics.
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bn, strict=True))
    # Dropout alone: in evaluation the model is the one without it (the same
    # Linears: a Dropout draws nothing when it is built).
    dropped, plain = small(name, dropout=0.5).eval(), small(name).eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(batch), plain(batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", POOLED)
def test_a_model_with_dropout_and_batch_norm_trains(name):
    batch, labels = fixed_batch(256)
    model = small(name, dropout=0.1, batch_norm=True)
    dense_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparse_opt = SparseAdam(model, lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), labels).item()
        model.train()
        return loss

    model(batch)  # one training pass inserts the batch's ids (evaluation looks up, never inserts)
    sparse_opt.zero_grad()
    before = eval_loss()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), labels)
        loss.backward()
        bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        assert bn and all(m.weight.grad is not None for m in bn)
        assert all(t.pending_gradients() is not None for t in model.tables())
        dense_opt.step()
        sparse_opt.step()
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (name, losses)
    assert eval_loss() < 0.8 * before, (name, before, eval_loss())
