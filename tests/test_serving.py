"""Serving exports and the Predictor: `recis export`, `recis predict`,
`recis.serving` — parity with the trainer's evaluation, precisions, and
damaged or foreign exports."""

import contextlib
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recis.cli import main
from recis.config import Job, load_config
from recis.datagen import generate
from recis.io import OrcDataset
from recis.io.pipeline import FeatureInput, InputPipeline
from recis.models import MODELS, SEQUENCE_MODELS, build_model, model_spec
from recis.nn import EmbeddingOption, NormalInit
from recis.optim import SparseAdam
from recis.ragged import RaggedTensor
from recis.serving import ExportError, Predictor, export, export_checkpoint, verify_export
from recis.serving.server import make_server, shutdown

CONFIG = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc"]
eval = ["data/part-00002.orc"]
dense = ["I1", "I2", "I3"]
dense_transform = "log1p"
batch_size = 512

[model]
name = "deepfm"
dim = 8
hidden = [32, 16]

[[feature]]
name = "C1"
[[feature]]
name = "C2"
combiner = "mean"
eval_missing = "initial"
[[feature]]
name = "C3"
shared = "c34"
[[feature]]
name = "C4"
shared = "c34"

[optimizer]
sparse_lr = 0.01
dense_lr = 0.002

[trainer]
output_dir = "out"
log_every_steps = 50
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DeepFM job trained by `recis train` (coalesced tables, a shared
    table, an "initial" missing-id policy), and its config."""
    d = tmp_path_factory.mktemp("serving")
    generate(str(d / "data"), 12000, files=3, vocab=3000, seed=0)
    (d / "job.toml").write_text(CONFIG)
    assert main(["train", "--config", str(d / "job.toml")]) == 0
    return d


def trainer_scores(job_dir) -> tuple[np.ndarray, np.ndarray, float]:
    """What the trainer's evaluation computes for the job's checkpoint:
    (scores, labels, its AUC), through the job's own model and pipeline."""
    cfg = load_config(str(job_dir / "job.toml"))
    job = Job(cfg, for_training=False)
    job.trainer.checkpoints.load(None, tables=job.trainer.tables, model=job.model, parts=("sparse", "dense"))
    job.model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in job.eval_dataset:
            scores.append(torch.sigmoid(job.model(job.input_fn(batch)).float()))
            labels.append(batch["label"].float())
    auc = job.trainer.evaluate()["auc"]
    return torch.cat(scores).numpy(), torch.cat(labels).numpy(), auc


def test_exported_checkpoint_scores_equal_the_trainers_evaluation(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(trained / "out" / "checkpoints"), "-o", str(out)]) == 0
    assert "generation 1" in capsys.readouterr().out
    manifest, meta = verify_export(str(out))
    assert manifest["generation"] == 1 and manifest["step"] == meta["step"] > 0
    assert set(meta["tables"]) == {"C1", "C2", "c34"}
    assert meta["features"]["C3"]["table"] == meta["features"]["C4"]["table"] == "c34"
    assert meta["features"]["C2"]["missing"] == "initial"
    predictor = Predictor(str(out))
    got = predictor.predict_files([str(trained / "data" / "part-00002.orc")], batch_size=333)
    want, labels, trainer_auc = trainer_scores(trained)
    assert got["score"].shape == want.shape
    assert np.abs(got["score"] - want).max() <= 1e-6
    np.testing.assert_array_equal(got["label"], labels)
    # The same AUC: the trainer's streaming AUROC, and sklearn's on the scores.
    assert roc_auc_score(labels, got["score"]) == pytest.approx(trainer_auc, abs=1e-6)
    assert roc_auc_score(labels, got["score"]) == pytest.approx(roc_auc_score(labels, want), abs=1e-12)


def test_recis_predict_writes_the_scores_as_parquet(trained, tmp_path, capsys):
    out = tmp_path / "export"
    export_checkpoint(str(trained / "out" / "checkpoints"), str(out))
    pred = tmp_path / "predictions.parquet"
    data = str(trained / "data" / "part-00002.orc")
    assert main(["predict", "--export", str(out), "--data", data, "-o", str(pred)]) == 0
    line = capsys.readouterr().out
    table = pq.read_table(pred)
    assert table.column_names == ["score", "label"]
    direct = Predictor(str(out)).predict_files([data])
    np.testing.assert_array_equal(table["score"].to_numpy(), direct["score"])
    auc = float(re.search(r"AUC (0\.\d+)", line).group(1))
    assert auc == pytest.approx(roc_auc_score(direct["label"], direct["score"]), abs=1e-4)


def test_serving_holds_embeddings_only(trained, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(str(trained / "out" / "checkpoints"), str(out))
    predictor = Predictor(str(out))
    cfg = load_config(str(trained / "job.toml"))
    job = Job(cfg, for_training=False)
    job.trainer.checkpoints.load(None, tables=job.trainer.tables, model=job.model)
    train_tables = job.model.embedding.tables()
    assert sum(len(t) for t in train_tables) == predictor.stats()["ids"] > 0
    for t in predictor.model.embedding.tables():
        assert t.native.slot_width == 0  # no optimizer slots
    train_bytes = sum(t.stats()["total_bytes"] for t in train_tables)
    assert predictor.stats()["table_bytes"] < train_bytes  # Adam's two slots a value are gone


def small_model(name: str, seed: int = 0, dims=(4, 4), **kw):
    """``dims``: the tables' own widths (a width other than the model's 4
    is projected to it: per-feature dims)."""
    extra = 1 if name in ("deepfm", "wide_deep") else 0
    fields = {
        "u": EmbeddingOption(dim=dims[0] + extra, initializer=NormalInit(0, 0.1), seed=1),
        "i": EmbeddingOption(
            dim=dims[1] + extra,
            initializer=NormalInit(0, 0.1),
            seed=2,
            eval_missing="initial",
        ),
    }
    torch.manual_seed(seed)
    kwargs = {"bottom": (8, 4), "top": (8,)} if name == "dlrm" else {}
    if name in SEQUENCE_MODELS:  # "i" as a history ([B, L, D]), read against "u"
        fields["i"] = replace(fields["i"], combiner="tuple")
        kwargs = {"target": "u", "history": "i", "hidden": (8,)}
    return MODELS[name](fields, num_dense=2, dim=4, **kwargs, **kw)


def batch(ids_u, ids_i, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(ids_u)
    return {
        "u": RaggedTensor(torch.tensor(ids_u, dtype=torch.int64), torch.arange(n + 1)),
        "i": torch.tensor(ids_i, dtype=torch.int64).reshape(n, -1),
        "dense": torch.rand(n, 2, generator=g),
    }


def train_three_steps(model):
    """3 steps of ``model`` on ``batch``es of 64 rows (SparseAdam + Adam)."""
    opt = SparseAdam(model, lr=0.05)
    dense = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(3):
        b = batch(list(range(step, step + 64)), [[i, i + 1] for i in range(64)], seed=step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), torch.rand(64).round())
        dense.zero_grad()
        opt.zero_grad()
        loss.backward()
        dense.step()
        opt.step()


def assert_serves_its_evaluation(model, tmp_path) -> Predictor:
    """Exports ``model`` and checks its Predictor scores known and unknown
    ids (10**9: zeros for u, its initial value for i) as the model does in
    evaluation, to 1e-6; returns the Predictor."""
    export(model, str(tmp_path / "x"))
    predictor = Predictor(str(tmp_path / "x"))
    b = batch([1, 2, 10**9, 5], [[3, 4], [10**9, 1], [7, 8], [10**9, 10**9 + 1]], seed=9)
    model.eval()
    with torch.no_grad():
        want = torch.sigmoid(model(b))
    torch.testing.assert_close(predictor.predict(b), want, rtol=0, atol=1e-6)
    return predictor


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_round_trips(name, tmp_path):
    model = small_model(name)
    train_three_steps(model)
    spec = model_spec(model)
    assert build_model(json.loads(json.dumps(spec))) is not None
    predictor = assert_serves_its_evaluation(model, tmp_path)
    assert len(predictor.model.embedding.tables()[0]) == sum(len(t) for t in model.tables())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_feature_dims_train_and_serve_the_models_evaluation(name, tmp_path):
    """Tables 3 and 7 wide in a model 4 wide: each is projected by its own
    Linear, which trains, is exported and serves the model's scores."""
    model = small_model(name, dims=(3, 7))
    widths = {f: o.dim for f, o in model.embedding.options.items()}
    extra = 1 if name in ("deepfm", "wide_deep") else 0
    assert widths == {"u": 3 + extra, "i": 7 + extra}
    proj = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("project.")}
    assert {k: tuple(v.shape) for k, v in proj.items()} == {
        "project.proj.u.weight": (4 + extra, 3 + extra),
        "project.proj.i.weight": (4 + extra, 7 + extra),
    }
    train_three_steps(model)
    after = model.state_dict()
    assert all(not torch.equal(proj[k], after[k]) for k in proj), "the projections train"
    assert_serves_its_evaluation(model, tmp_path)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dropout_and_batch_norm_serve_the_models_evaluation(name, tmp_path):
    model = small_model(name, dropout=0.3, batch_norm=True)
    train_three_steps(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(int(m.num_batches_tracked) == 3 for m in norms)
    export(model, str(tmp_path / "x"))
    predictor = Predictor(str(tmp_path / "x"))
    assert predictor.model.state_dict().keys() == model.state_dict().keys()
    served = [m for m in predictor.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for a, b in zip(norms, served, strict=True):  # the running statistics travel with the dense weights
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    b = batch([1, 2, 10**9, 5], [[3, 4], [10**9, 1], [7, 8], [10**9, 10**9 + 1]], seed=9)
    model.eval()
    with torch.no_grad():
        want = torch.sigmoid(model(b))
    torch.testing.assert_close(predictor.predict(b), want, rtol=0, atol=1e-6)
    one = batch([2], [[10**9, 1]], seed=9)
    one["dense"] = b["dense"][1:2]
    torch.testing.assert_close(predictor.predict(one), want[1:2], rtol=0, atol=1e-6)  # a batch of one row


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_rows(precision, tmp_path):
    model = small_model("deepfm")
    model(batch(list(range(500)), [[i] for i in range(500)]))  # a training lookup inserts 500 ids a table
    export(model, str(tmp_path / "fp32"))
    export(model, str(tmp_path / precision), precision=precision)
    full, small = Predictor(str(tmp_path / "fp32")), Predictor(str(tmp_path / precision))
    size = lambda d: sum(os.path.getsize(d / f) for f in os.listdir(d) if f.startswith("table-"))  # noqa: E731
    assert size(tmp_path / precision) < size(tmp_path / "fp32")
    view_full = full.model.embedding.logical_tables()["u"]
    view_small = small.model.embedding.logical_tables()["u"]
    ids = torch.arange(500)
    a, b = view_full.embeddings(ids), view_small.embeddings(ids)
    if precision == "fp16":
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)
    else:
        step = a.abs().amax(dim=1, keepdim=True) / 127
        assert bool(((a - b).abs() <= step / 2 + 1e-7).all())
    b_ = batch([1, 2, 3], [[4], [5], [6]])
    torch.testing.assert_close(small.predict(b_), full.predict(b_), rtol=0, atol=5e-3)


def exported(tmp_path) -> str:
    model = small_model("wide_deep")
    model(batch(list(range(50)), [[i] for i in range(50)]))
    return export(model, str(tmp_path / "export"), chunk_rows=16)


def test_a_damaged_export_is_refused_naming_the_file(tmp_path):
    d = exported(tmp_path)
    files = sorted(f for f in os.listdir(d) if f.startswith("table-"))
    assert len(files) > 2  # 50 rows a table in chunks of 16
    victim = os.path.join(d, files[1])
    data = bytearray(open(victim, "rb").read())
    open(victim, "wb").write(bytes(data[: len(data) // 2]))
    with pytest.raises(ExportError, match=re.escape(files[1]) + r".*bytes, the manifest says"):
        Predictor(d)
    data[-1] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(ExportError, match=re.escape(files[1]) + r": checksum mismatch"):
        Predictor(d)
    os.remove(victim)
    with pytest.raises(ExportError, match=re.escape(files[1]) + r": missing"):
        Predictor(d)


def test_a_foreign_or_tampered_export_is_refused(tmp_path):
    d = exported(tmp_path)
    with pytest.raises(ExportError, match="not a serving export"):
        Predictor(str(tmp_path))
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    # meta.json of another model, with its checksum mended: the model id tells.
    meta["model"]["args"]["hidden"] = [7]
    json.dump(meta, open(meta_path, "w"))
    from recis import _native

    manifest["files"]["meta.json"] = {"bytes": os.path.getsize(meta_path), "digest": _native.checksum_file(meta_path)}
    json.dump(manifest, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(ExportError, match="its model is not the one the manifest names"):
        Predictor(d)
    manifest["files"]["../etc/passwd"] = {"bytes": 1, "digest": "x"}
    json.dump(manifest, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(ExportError, match="not a plain name"):
        Predictor(d)
    open(os.path.join(d, "manifest.json"), "w").write("{not json")
    with pytest.raises(ExportError, match=r"manifest.json: not valid JSON"):
        Predictor(d)
    json.dump({"format": "something-else", "version": 1}, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(ExportError, match="not a RecIS serving export"):
        Predictor(d)


def test_export_refuses_to_clobber_and_replaces_with_a_new_generation(tmp_path):
    d = exported(tmp_path)
    model = small_model("wide_deep")
    with pytest.raises(ExportError, match="not empty"):
        export(model, d)
    export(model, d, overwrite=True)
    assert verify_export(d)[0]["generation"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="no manifest.json"):
        export(model, str(other), overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_requests_with_unknown_features_are_refused(tmp_path):
    p = Predictor(exported(tmp_path))
    b = batch([1], [[2]])
    b["nope"] = b["u"]
    with pytest.raises(KeyError, match=r"unknown inputs \['nope'\]"):
        p.predict(b)
    with pytest.raises(ExportError, match="no input pipeline"):
        p.predict_files(["x.orc"])


def test_what_cannot_be_exported_is_refused(tmp_path, trained):
    with pytest.raises(ExportError, match="not a zoo model"):
        export(torch.nn.Linear(2, 1), str(tmp_path / "x"))
    model = small_model("deepfm")
    with torch.no_grad():
        model.embedding.tables()[0].native.import_rows(
            np.array([7], dtype=np.int64),
            np.full((1, 5), np.nan, dtype=np.float32),
            np.zeros(1, np.uint32),
            np.zeros(1, np.uint32),
            0,
        )
    with pytest.raises(ExportError, match=r"table 'u': 1 rows hold a NaN or an infinity \(id 7"):
        export(model, str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "y")
    # A checkpoint that records no model spec (saved before exports existed).
    ckpt = tmp_path / "ckpt"
    src = sorted((trained / "out" / "checkpoints").glob("ckpt-*"))[-1]
    shutil.copytree(src, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert "model_spec" in meta["extra"] and "pipeline" in meta["extra"]
    assert main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "z")]) == 1


# -- the HTTP endpoint -----------------------------------------------------------


@contextlib.contextmanager
def serving(export_dir, **kwargs):
    """`recis serve`'s server on a free loopback port, in a thread."""
    server = make_server(Predictor(str(export_dir)), port=0, **kwargs)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        shutdown(server, thread)
        assert not thread.is_alive()


def post(url, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_scores_equal_the_predictors(trained, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(str(trained / "out" / "checkpoints"), str(out))
    data = str(trained / "data" / "part-00002.orc")
    want = Predictor(str(out)).predict_files([data])["score"]
    table = po.read_table(data, columns=["C1", "C2", "C3", "C4", "I1", "I2", "I3"]).slice(0, 300)
    rows = table.to_pylist()
    with serving(out) as url:
        with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["generation"] == 1
        for lo, hi in ((0, 1), (1, 257), (257, 300)):  # batch 1, 256, the rest
            status, body = post(url, {"rows": rows[lo:hi]})
            assert status == 200, body
            np.testing.assert_allclose(np.array(body["scores"], dtype=np.float32), want[lo:hi], rtol=0, atol=1e-6)


def string_export(tmp_path):
    """A model whose feature "u" hashes a string column (bucket 1000) and
    "i" reads a list column, trained a step on an ORC file of them."""
    path = str(tmp_path / "s.orc")
    g = np.random.default_rng(0)
    n = 200
    po.write_table(
        pa.table(
            {
                "label": pa.array(g.integers(0, 2, n), pa.int64()),
                "u_str": pa.array([f"user-{k % 37}" for k in range(n)]),
                "i": pa.array([[int(x) for x in g.integers(0, 50, k % 3 + 1)] for k in range(n)], pa.list_(pa.int64())),
                "d1": pa.array(g.random(n)),
                "d2": pa.array([None if k % 7 == 0 else float(k) for k in range(n)], pa.float64()),
            }
        ),
        path,
    )
    pipe = InputPipeline(
        features=[FeatureInput("u", "u_str", hash=True, bucket=1000), FeatureInput("i", "i")],
        dense=["d1", "d2"],
        dense_transform="log1p",
    )
    model = small_model("deepfm")
    opt = SparseAdam(model, lr=0.05)
    for b in OrcDataset([path], 64, pipe.columns()):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pipe(b)), b["label"].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export(model, str(tmp_path / "sexport"), pipeline=pipe), path


def test_http_hashes_strings_as_the_reader_does(tmp_path):
    out, path = string_export(tmp_path)
    want = Predictor(out).predict_files([path])["score"]
    rows = po.read_table(path, columns=["u_str", "i", "d1", "d2"]).to_pylist()
    with serving(out) as url:
        status, body = post(url, {"rows": rows})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["scores"], dtype=np.float32), want, rtol=0, atol=1e-6)


def test_http_bad_requests_are_named(tmp_path):
    out, path = string_export(tmp_path)
    good = {"u_str": "user-1", "i": [1, 2], "d1": 0.5, "d2": None}
    cases = [
        ({"rows": [good, {**good, "extra": 1}]}, 400, r"row 1: unknown columns \['extra'\]"),
        ({"rows": [{k: v for k, v in good.items() if k != "i"}]}, 400, r"row 0: missing columns \['i'\]"),
        ({"rows": [{**good, "i": ["x"]}]}, 400, r"row 0: column 'i': ids must be int64 integers, got 'x'"),
        ({"rows": [{**good, "i": [2**64]}]}, 400, r"ids must be int64 integers"),
        ({"rows": [{**good, "u_str": 5}]}, 400, r"column 'u_str': the feature hashes strings, got 5"),
        ({"rows": [{**good, "d1": "high"}]}, 400, r"column 'd1': expected a number or null, got 'high'"),
        ({"rows": []}, 400, r"at least one row"),
        ({"nope": 1}, 400, r'expected \{"rows"'),
        ({"rows": [good] * 11}, 413, r"11 rows is beyond the limit of 10"),
    ]
    with serving(out, max_rows=10) as url:
        for body, status, message in cases:
            got, reply = post(url, body)
            assert got == status and re.search(message, reply["error"]), (body, got, reply)
        got, reply = post(url, None, raw=b"{not json")
        assert got == 400 and "not valid JSON" in reply["error"]
        status, body = post(url, {"rows": [good]})  # still serving
        assert status == 200 and len(body["scores"]) == 1
