"""Sequence models (issue #15): `recis datagen --behaviour`, DIN and BST —
masks, empty histories, specs and serving, [[feature]] combiner =
"sequence" / max_len, and DIN beating DeepFM on behaviour data."""

import json
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recis.cli import main
from recis.config import ConfigError, Job, load_config
from recis.datagen import generate
from recis.io import OrcDataset
from recis.io.pipeline import FeatureInput, InputPipeline
from recis.models import BST, DIN, SEQUENCE_MODELS, DeepFM, build_model, model_spec
from recis.nn import EmbeddingOption, NormalInit
from recis.nn.options import name_seed
from recis.optim import SparseAdam
from recis.ragged import RaggedTensor, batch_rows
from recis.serving import Predictor, export, export_checkpoint
from recis.synthetic import SyntheticBehaviour, SyntheticCTR


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the Transformer's small ops are many times
    slower when two threads share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- datagen --------------------------------------------------------------------


def old_generate(output_dir, rows, files, vocab, seed, compression="zstd"):
    """`recis.datagen.generate` as it was before --behaviour (its body,
    through SyntheticCTR.batch)."""
    os.makedirs(output_dir, exist_ok=True)
    data = SyntheticCTR(num_features=26, num_dense=13, vocab=vocab, seed=seed, min_ids=1, max_ids=3)
    rng = np.random.default_rng(seed)
    paths = []
    per_file = -(-rows // files)
    for k in range(files):
        n = min(per_file, rows - k * per_file)
        if n <= 0:
            break
        feats, dense, labels = data.batch(n, rng)
        cols = {"label": pa.array(labels.numpy().astype(np.int64))}
        for i in range(13):
            cols[f"I{i + 1}"] = pa.array(dense[:, i].numpy())
        for name, rt in feats.items():
            cols[name] = pa.ListArray.from_arrays(
                pa.array(rt.offsets.numpy().astype(np.int32)), pa.array(rt.values.numpy())
            )
        path = os.path.join(output_dir, f"part-{k:05d}.orc")
        po.write_table(pa.table(cols), path, compression=compression)
        paths.append(path)
    return paths


def test_datagen_without_behaviour_is_byte_identical(tmp_path, capsys):
    want = [open(p, "rb").read() for p in old_generate(str(tmp_path / "old"), 2500, 3, 700, 5)]
    for kw in ({}, {"behaviour": False}):
        got = generate(str(tmp_path / f"new{len(kw)}"), 2500, files=3, vocab=700, seed=5, **kw)
        assert [open(p, "rb").read() for p in got] == want
    assert main(["datagen", "-o", str(tmp_path / "cli"), "--rows", "2500", "--files", "3", "--vocab", "700"]) == 0
    capsys.readouterr()
    cli = sorted((tmp_path / "cli").iterdir())
    old = old_generate(str(tmp_path / "old0"), 2500, 3, 700, 0)
    assert [p.read_bytes() for p in cli] == [open(p, "rb").read() for p in old]


def test_datagen_behaviour_columns_and_click_model(tmp_path, capsys):
    assert main(["datagen", "-o", str(tmp_path / "x"), "--rows", "100", "--items", "50"]) == 2
    assert "go with --behaviour" in capsys.readouterr().err
    args = ["datagen", "-o", str(tmp_path / "b"), "--rows", "6000", "--files", "2", "--vocab", "500", "--behaviour"]
    assert main([*args, "--items", "300", "--categories", "10", "--max-history", "25", "--seed", "3"]) == 0
    capsys.readouterr()
    paths = sorted((tmp_path / "b").iterdir())
    plain = po.read_table(old_generate(str(tmp_path / "plain"), 6000, 2, 500, 3)[0])
    t = po.read_table(str(paths[0]))
    assert t.schema.names == [*plain.schema.names, "item", "hist_items"]
    assert t.schema.field("item").type == pa.int64() and t.schema.field("hist_items").type == pa.list_(pa.int64())
    for c in plain.schema.names[1:]:  # the Criteo layout's features are as before; the labels are drawn anew
        assert t.column(c).equals(plain.column(c)), c
    hist, item, label = t.column("hist_items").to_pylist(), t.column("item").to_numpy(), t.column("label").to_numpy()
    lengths = np.array([len(h) for h in hist])
    assert lengths.min() == 0 and lengths.max() == 25
    # The hidden click model: clicks rise with the history's items of the target's category.
    beh = SyntheticBehaviour(items=300, categories=10, max_history=25, seed=3)
    cat = {int(i): r % 10 for r, i in enumerate(beh.ids_of(np.arange(300)))}
    assert set(item.tolist()) <= set(cat) and {x for h in hist for x in h} <= set(cat)
    matches = np.array([sum(cat[x] == cat[int(i)] for x in h) for i, h in zip(item, hist, strict=True)])
    assert roc_auc_score(label, matches) > 0.65


# -- the models ---------------------------------------------------------------------


def options(width=8, init=0.1):
    base = EmbeddingOption(dim=width, initializer=NormalInit(0.0, init))
    return {
        "user": replace(base, seed=1),
        "item": replace(base, seed=2, shared_name="items"),
        "hist": replace(base, seed=2, shared_name="items", combiner="tuple"),
    }


def make(name, **kw):
    torch.manual_seed(0)
    extra = {"heads": 2, "feedforward": 16, "max_len": 6} if name == "bst" else {"attention": (8,)}
    cls = DIN if name == "din" else BST
    return cls(options(), num_dense=2, dim=8, target="item", history="hist", hidden=(16,), **extra, **kw)


def batch(hist_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(hist_rows)
    lengths = torch.tensor([len(h) for h in hist_rows])
    return {
        "user": torch.arange(100, 100 + n).unsqueeze(1),
        "item": torch.arange(1, n + 1).unsqueeze(1),
        "hist": RaggedTensor.from_lengths(torch.tensor([x for h in hist_rows for x in h], dtype=torch.int64), lengths),
        "dense": torch.rand(n, 2, generator=g),
    }


ROWS = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9], [2, 2]]


def trained(name, steps=5, **kw):
    model = make(name, **kw)
    dense, sparse = torch.optim.Adam(model.parameters(), lr=0.01), SparseAdam(model, lr=0.05)
    for step in range(steps):
        b = batch(ROWS * 4, seed=step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), torch.rand(20).round())
        loss.backward()
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
    return model.eval()


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_padding_never_counts(name):
    model = trained(name)
    b = batch(ROWS)
    with torch.no_grad():
        pooled, seq, mask = model.lookup(b)
        assert seq.shape == (5, 5, 8) and mask.tolist()[1] == [False] * 5 and mask.sum().item() == 11
        assert torch.equal(seq[~mask], torch.zeros(int((~mask).sum()), 8))  # the engine's padding
        want = model.logits(pooled, seq, mask, b)
        noisy = seq.clone()
        noisy[~mask] = torch.randn(int((~mask).sum()), 8) * 100  # anything at the padding
        torch.testing.assert_close(model.logits(pooled, noisy, mask, b), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(b), want, rtol=0, atol=0)
        if name == "din":
            w = model.attention_weights(pooled[:, 1], noisy, mask)
            assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
            assert bool((w[mask] > 0).all() and (w[mask] < 1).all())
        # A row scores the same in any batch: alone, or padded to a longer row.
        for r in range(len(ROWS)):
            torch.testing.assert_close(model(batch_rows(b, r, r + 1)), want[r : r + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_empty_histories(name):
    model = make(name)
    b = batch([[], [3, 4], []])
    out = model(b)  # training: the empty rows' ids are none, their interest 0
    assert out.shape == (3,) and bool(torch.isfinite(out).all())
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("position")), name
    model.eval()
    with torch.no_grad():
        none = model(batch([[], [], []]))  # L = 0: [B, 0, D]
        assert none.shape == (3,) and bool(torch.isfinite(none).all())
        torch.testing.assert_close(model(batch([[], [3, 4], []]))[[0, 2]], none[[0, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_spec_round_trip_and_serving(name, tmp_path):
    model = trained(name, dropout=0.1, batch_norm=True)
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec["name"] == name and spec["args"]["target"] == "item" and spec["args"]["history"] == "hist"
    assert dict(spec["features"])["hist"]["combiner"] == "tuple"
    rebuilt = build_model(spec)
    assert [type(m).__name__ for m in rebuilt.modules()] == [type(m).__name__ for m in model.modules()]
    rebuilt.load_state_dict(model.state_dict())  # dense weights and the tables
    rebuilt.eval()
    b = batch([[1, 2, 3], [], [10**9, 4], [5]], seed=3)
    with torch.no_grad():
        want = model(b)
        torch.testing.assert_close(rebuilt(b), want, rtol=0, atol=0)
    export(model, str(tmp_path / "x"))
    torch.testing.assert_close(Predictor(str(tmp_path / "x")).predict(b), torch.sigmoid(want), rtol=0, atol=1e-6)


def with_combiner(field, combiner):
    return {**options(), field: replace(options()[field], combiner=combiner)}


def test_field_names_share_the_target_table_and_bad_arguments():
    for cls in (DIN, BST):
        m = cls(["user", "item", "hist"], dim=8, target="item", history="hist")
        assert m.embedding.table_of == {"user": "user", "item": "item", "hist": "item"}
        assert m.embedding.options["hist"].combiner == "tuple" and m.embedding.options["item"].combiner == "sum"
        assert m.embedding.options["hist"].seed == m.embedding.options["item"].seed == name_seed(0, "item")
        assert m(batch(ROWS)).shape == (5,)
        name = cls.__name__
        with pytest.raises(ValueError, match=f"{name}: history='h' must name one of its sparse fields"):
            cls(["user", "item"], target="item", history="h")
        with pytest.raises(ValueError, match=f"{name}: history 'hist' must be a sequence"):
            cls(
                {**options(), "hist": replace(options()["hist"], combiner="mean")}, dim=8, target="item", history="hist"
            )
        with pytest.raises(ValueError, match=f"{name}: target 'item' must be pooled"):
            cls(
                {**options(), "item": replace(options()["item"], combiner="tuple")},
                dim=8,
                target="item",
                history="hist",
            )
        with pytest.raises(ValueError, match="this model pools them"):
            cls(
                {**options(), "user": replace(options()["user"], combiner="tuple")},
                dim=8,
                target="item",
                history="hist",
            )
        with pytest.raises(ValueError, match=f"{name}: dropout must be"):
            cls(options(), dim=8, target="item", history="hist", dropout=1.0)
    with pytest.raises(ValueError, match="BST: heads=3 must divide dim=8"):
        BST(options(), dim=8, target="item", history="hist", heads=3)
    with pytest.raises(ValueError, match="sequence models: din, bst"):
        DeepFM({**options(9), "hist": options(9)["hist"]}, dim=8)


def test_pipeline_max_len_keeps_the_newest():
    pipe = InputPipeline([FeatureInput("h", "h", max_len=2), FeatureInput("u", "u")], label=None)
    rt = RaggedTensor(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 3, 3, 4, 6]))
    out = pipe({"h": rt, "u": torch.tensor([7, 8, 9, 10])})
    assert out["h"].offsets.tolist() == [0, 2, 2, 3, 5] and out["h"].values.tolist() == [2, 3, 4, 5, 6]
    assert out["u"].tolist() == [[7], [8], [9], [10]]
    js = pipe.to_json()
    assert js["features"][0]["max_len"] == 2 and "max_len" not in js["features"][1]  # as before max_len
    assert InputPipeline.from_json(js) == replace(pipe, where="input pipeline")
    with pytest.raises(ValueError, match="max_len must be an int >= 0"):
        InputPipeline([FeatureInput("h", "h", max_len=-1)])


@pytest.fixture(scope="module")
def behaviour_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("behaviour")
    return generate(str(d), 30000, files=5, vocab=1000, seed=0, behaviour=True, items=500, categories=20)


# -- config ---------------------------------------------------------------------

CONFIG = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc", "data/part-00002.orc", "data/part-00003.orc"]
eval = ["data/part-00004.orc"]
dense = ["I1"]
batch_size = 256

[model]
name = "din"
dim = 8
target = "item"
history = "hist_items"
attention = [16]
hidden = [32]

[[feature]]
name = "C1"
[[feature]]
name = "item"
shared = "items"
[[feature]]
name = "hist_items"
combiner = "sequence"
max_len = 10
shared = "items"

[optimizer]
sparse_lr = 0.02
dense_lr = 0.003

[trainer]
output_dir = "out"
epochs = 3
log_every_steps = 100
"""


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_recis_train_a_sequence_model_and_serve_it(name, behaviour_files, tmp_path, capsys):
    data = os.path.dirname(behaviour_files[0])
    out = tmp_path / "out"
    text = CONFIG.replace('"data/', f'"{data}/').replace('output_dir = "out"', f"output_dir = {json.dumps(str(out))}")
    if name == "bst":
        text = text.replace('name = "din"', 'name = "bst"').replace(
            "attention = [16]", "max_len = 10\nfeedforward = 16"
        )
    cfg_path = str(tmp_path / "job.toml")
    (tmp_path / "job.toml").write_text(text)
    assert main(["train", "--config", cfg_path, "--threads", "1"]) == 0
    capsys.readouterr()
    cfg = load_config(cfg_path)
    assert cfg.features[2].combiner == "sequence" and cfg.features[2].max_len == 10
    job = Job(cfg, for_training=False)
    assert type(job.model).__name__ == name.upper()
    assert job.pipeline.features[2].max_len == 10
    assert job.model.embedding.options["hist_items"].combiner == "tuple"
    assert job.model.embedding.table_of["hist_items"] == job.model.embedding.table_of["item"] == "items"
    job.trainer.checkpoints.load(None, tables=job.trainer.tables, model=job.model, parts=("sparse", "dense"))
    job.model.eval()
    scores = []
    with torch.no_grad():
        for b in job.eval_dataset:
            assert int(job.input_fn(b)["hist_items"].lengths().max()) <= 10
            scores.append(torch.sigmoid(job.model(job.input_fn(b))))
    auc = job.trainer.evaluate()["auc"]
    if name == "din":
        assert auc > 0.64, auc  # as in test_din_beats_deepfm_on_behaviour_data
    # The export serves the job's evaluation, its pipeline cutting the histories.
    export_checkpoint(str(out / "checkpoints"), str(tmp_path / "export"))
    served = Predictor(str(tmp_path / "export")).predict_files([behaviour_files[4]], batch_size=256)
    np.testing.assert_allclose(served["score"], torch.cat(scores).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "edit, message",
    [
        (("max_len = 10\n", "max_len = -1\n"), r"\(hist_items\)\.max_len: must be >= 0"),
        (('name = "C1"\n', 'name = "C1"\nmax_len = 3\n'), r"\(C1\)\.max_len: 3 with combiner = 'sum'"),
        (('name = "din"', 'name = "deepfm"'), r"combiner = \"sequence\" is a sequence model's history"),
        (('history = "hist_items"\n', ""), r"\[model\] \(din\): history is required"),
        (('target = "item"', 'target = "nope"'), r"\[model\]\.target: 'nope' is not a \[\[feature\]\]"),
        (
            ('combiner = "sequence"\nmax_len = 10\n', ""),
            r"\[model\]\.history: \[\[feature\]\] 'hist_items' needs combiner",
        ),
        (('name = "item"\n', 'name = "item"\ncombiner = "sequence"\n'), r"\[model\]\.target: .*is pooled"),
        (('combiner = "sequence"', 'combiner = "tuple"'), r"combiner: 'tuple' is not one of"),
    ],
)
def test_bad_sequence_configs_are_named(edit, message, tmp_path):
    (tmp_path / "job.toml").write_text(CONFIG.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "job.toml"))


# -- DIN beats DeepFM on behaviour data ----------------------------------------------

OTHER, DENSE = ["C1", "C2"], ["I1"]


def fit_and_auc(name, files, seed):
    """Held-out AUC of ``name`` trained 3 epochs on files[:4]: C1, C2, I1,
    the target item and its history (the last 20), one shared item table;
    the same dims, optimizers and steps for every model."""
    pipe = InputPipeline(
        [FeatureInput(f, f) for f in [*OTHER, "item"]] + [FeatureInput("hist_items", "hist_items", max_len=20)],
        dense=DENSE,
    )
    width = 8 + (1 if name == "deepfm" else 0)
    base = EmbeddingOption(dim=width, initializer=NormalInit(0.0, 0.05))
    opts = {f: replace(base, seed=name_seed(seed, f)) for f in OTHER}
    opts["item"] = replace(base, seed=name_seed(seed, "items"), shared_name="items")
    opts["hist_items"] = replace(opts["item"], combiner="sum" if name == "deepfm" else "tuple")
    torch.manual_seed(seed)
    kw = dict(num_dense=1, dim=8, hidden=(64, 32))
    seq = dict(target="item", history="hist_items")
    model = {
        "deepfm": lambda: DeepFM(opts, **kw),
        "din": lambda: DIN(opts, attention=(32,), **seq, **kw),
        "bst": lambda: BST(opts, max_len=20, heads=2, feedforward=32, **seq, **kw),
    }[name]()
    dense, sparse = torch.optim.Adam(model.parameters(), lr=0.003), SparseAdam(model, lr=0.02)
    train = OrcDataset(files[:4], 256, pipe.columns(), shuffle=True, seed=seed)
    for _epoch in range(3):
        for b in train:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pipe(b)), b["label"].float())
            loss.backward()
            dense.step()
            sparse.step()
            dense.zero_grad()
            sparse.zero_grad()
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for b in OrcDataset(files[4:], 4096, pipe.columns()):
            scores.append(model(pipe(b)))
            labels.append(b["label"])
    return roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())


def test_din_beats_deepfm_on_behaviour_data(behaviour_files):
    # Measured with this setup (fit_and_auc; data and model seeds 0, 1, 2):
    # DIN 0.678/0.688/0.693, DeepFM 0.592/0.592/0.593: DIN ahead by 0.086,
    # 0.096, 0.100. The test runs seed 0 and asserts less than half the
    # smallest gap.
    din, deepfm = fit_and_auc("din", behaviour_files, 0), fit_and_auc("deepfm", behaviour_files, 0)
    assert din > 0.64, din
    assert din > deepfm + 0.04, (din, deepfm)


def test_bst_learns_the_behaviour_signal(behaviour_files):
    # Measured (seeds 0, 1, 2): BST 0.590/0.590/0.609, DeepFM 0.592/0.592/0.593:
    # BST learns the signal but does not beat DeepFM in these few steps, so
    # only the former is asserted.
    bst = fit_and_auc("bst", behaviour_files, 0)
    assert bst > 0.56, bst
