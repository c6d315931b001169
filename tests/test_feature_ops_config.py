"""Op chains in job configs: `[[feature]] ops = [...]` (and `columns` for a
cross) equal the Python FeatureEngine, run in training, evaluation and
serving alike, and a chain that does not type-check is refused before any
step, naming the feature and the op."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import pytest
import torch

from recis.cli import main
from recis.config import ConfigError, Job, load_config
from recis.datagen import generate
from recis.features import (
    Bucketize,
    Feature,
    FeatureCross,
    FeatureEngine,
    FillMissing,
    Hash,
    IDMultiHash,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
)
from recis.io import OrcDataset
from recis.ragged import RaggedTensor

FEATURES = """
[[feature]]
name = "I2_bucket"
column = "I2"
ops = [{ op = "fill_missing", value = -1.0 }, { op = "bucketize", boundaries = [0.0, 1.0, 4.0, 16.0, 64.0] }]
[[feature]]
name = "C1xC2"
columns = ["C1", "C2"]
ops = [{ op = "cross", bucket = 5000 }]
[[feature]]
name = "C3_multi"
column = "C3"
ops = [{ op = "multi_hash", buckets = [300, 700] }]
[[feature]]
name = "C4_last"
column = "C4"
ops = [{ op = "truncate", max_len = 1, side = "left" }, { op = "mod", mod = 50 }]
[[feature]]
name = "C5_hashed"
column = "C5"
ops = [{ op = "hash", bucket = 97 }]
[[feature]]
name = "C1"
"""

JOB = """
[data]
train = ["data/part-00000.orc"]
eval = ["data/part-00001.orc"]
dense = ["I1"]
dense_transform = "log1p"
batch_size = 512

[model]
name = "deepfm"
dim = 8
hidden = [16]
{features}
[optimizer]
sparse_lr = 0.02

[trainer]
output_dir = "out"
max_steps = 6
log_every_steps = 3
"""


def reference_engine():
    """The same chains, written with the Python API (run unfused: each op alone)."""
    feats = [
        Feature("I2_bucket")
        .add_op(SelectField("I2"))
        .add_op(FillMissing(-1.0))
        .add_op(Bucketize([0.0, 1.0, 4.0, 16.0, 64.0])),
        Feature("C1xC2").add_op(SelectFields(["C1", "C2"])).add_op(FeatureCross(5000)),
        Feature("C3_multi").add_op(SelectField("C3")).add_op(IDMultiHash([300, 700])),
        Feature("C4_last").add_op(SelectField("C4")).add_op(SequenceTruncate(1, side="left")).add_op(Mod(50)),
        Feature("C5_hashed").add_op(SelectField("C5")).add_op(Hash(97)),
    ]
    return FeatureEngine(feats, fuse=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops")
    generate(str(d / "data"), 4000, files=2, vocab=500, seed=4)
    return d


def job_at(tmp_path, data_dir, features=FEATURES):
    (tmp_path / "data").symlink_to(data_dir / "data")
    (tmp_path / "job.toml").write_text(JOB.format(features=features))
    return str(tmp_path / "job.toml")


def ids_of(x):
    """A model input's ids as (flat values, lengths a row)."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1), torch.full((x.shape[0],), x.shape[1] if x.dim() == 2 else 1)
    return x.values, x.offsets[1:] - x.offsets[:-1]


def test_op_chains_from_toml_equal_the_python_feature_engine(tmp_path, data_dir):
    job = Job(load_config(job_at(tmp_path, data_dir)))
    batch = next(iter(job.eval_dataset))
    got = job.pipeline(batch)
    want = reference_engine()(batch)
    for name in ("I2_bucket", "C1xC2", "C4_last", "C5_hashed"):
        gv, gl = ids_of(got[name])
        wv, wl = ids_of(want[name] if not isinstance(want[name], torch.Tensor) else want[name].reshape(len(gl), -1))
        assert torch.equal(gv, wv) and torch.equal(gl, wl), name
    # multi_hash of a list column: k ids an element, flattened.
    mh = want["C3_multi"]
    gv, gl = ids_of(got["C3_multi"])
    assert torch.equal(gv, mh.values.reshape(-1)) and torch.equal(gl, (mh.offsets[1:] - mh.offsets[:-1]) * 2)
    # The values against the ops' documented semantics, on the raw columns.
    i2 = batch["I2"].double().nan_to_num(-1.0)
    assert torch.equal(got["I2_bucket"].reshape(-1), torch.bucketize(i2, torch.tensor([0.0, 1, 4, 16, 64]).double()))
    assert int(got["C1xC2"].values.max()) < 5000 and int(got["C5_hashed"].values.max()) < 97
    # The fused engine of the job ran as few native calls as it could.
    assert "Bucketize x 1" in job.pipeline._engine.describe()
    # The plain feature reads C1 too (shared with the cross), untouched.
    assert torch.equal(got["C1"].values, batch["C1"].values)


def test_a_job_with_op_chains_trains_evaluates_exports_and_serves(tmp_path, data_dir, capsys):
    from recis.serving import Predictor
    from recis.serving.server import request_batch

    path = job_at(tmp_path, data_dir)
    assert main(["train", "--config", path]) == 0
    assert "eval: AUC" in capsys.readouterr().out
    ckpt = tmp_path / "out" / "checkpoints"
    assert main(["export", str(ckpt), "-o", str(tmp_path / "serve")]) == 0
    p = Predictor(str(tmp_path / "serve"))
    assert [f.ops for f in p.pipeline.features][:2] == [
        ({"op": "fill_missing", "value": -1.0}, {"op": "bucketize", "boundaries": [0.0, 1.0, 4.0, 16.0, 64.0]}),
        ({"op": "cross", "bucket": 5000},),
    ]
    # Served scores equal the trained model's on the same rows.
    job = Job(load_config(path), for_training=False)
    job.trainer.checkpoints.load(None, tables=job.trainer.tables, model=job.model, parts=("sparse", "dense"))
    job.model.eval()
    ds = OrcDataset(str(data_dir / "data" / "part-00001.orc"), 64, job.pipeline.columns(), shuffle=False)
    batch = next(iter(ds))
    with torch.no_grad():
        want = torch.sigmoid(job.model(job.pipeline(batch)).float()).reshape(-1)
    got = p.predict_batch(batch)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want.numpy(), atol=1e-6)
    # Over HTTP's request form (JSON rows): the same scores.
    t = po.read_table(data_dir / "data" / "part-00001.orc").slice(0, 64).to_pylist()
    cols = ["I1", "I2", "C1", "C2", "C3", "C4", "C5"]
    rows = [{c: r[c] for c in cols} for r in t]
    served = p.predict_batch(request_batch(p.pipeline, json.loads(json.dumps(rows))))
    np.testing.assert_allclose(np.asarray(served).reshape(-1), want.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "features, message",
    [
        (
            '[[feature]]\nname = "x"\ncolumn = "C1"\nops = [{ op = "hash" }, { op = "bucketize", boundaries = [1.0] }]',
            r"feature 'x': ops\[1\] \(bucketize\): bucketize takes numbers, and the input is ids",
        ),
        (
            '[[feature]]\nname = "x"\ncolumns = ["C1", "C99"]\nops = [{ op = "cross" }]',
            r'column "C99" not found',
        ),
        (
            '[[feature]]\nname = "x"\ncolumn = "I2"\nops = [{ op = "fill_missing", value = 0.0 }]',
            r"its ops end in floats, and a feature needs integer ids: end with bucketize",
        ),
        (
            '[[feature]]\nname = "x"\ncolumn = "I2"\nops = [{ op = "hash" }]',
            r"hash takes strings or integer ids, and the column holds floats",
        ),
        (
            '[[feature]]\nname = "x"\ncolumn = "I2"\nops = [{ op = "truncate", max_len = 2 }]',
            r"truncate takes a list column, and the input is floats",
        ),
    ],
)
def test_chains_that_do_not_type_check_are_refused_before_training(tmp_path, data_dir, capsys, features, message):
    path = job_at(tmp_path, data_dir, features)
    assert main(["train", "--config", path]) in (1, 2)  # 2: a config error, 1: the data's
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "features, message",
    [
        ('[[feature]]\nname = "x"\nops = [{ op = "frobnicate" }]', r"unknown op 'frobnicate'"),
        ('[[feature]]\nname = "x"\nops = [{ op = "mod" }]', r"ops\[0\] \(mod\): missing argument\(s\) \['mod'\]"),
        ('[[feature]]\nname = "x"\nops = [{ op = "mod", mod = 5, base = 2 }]', r"unknown argument\(s\) \['base'\]"),
        (
            '[[feature]]\nname = "x"\nops = [{ op = "bucketize", boundaries = [3.0, 1.0] }]',
            r"ops\[0\] \(bucketize\): .*boundaries must be sorted",
        ),
        ('[[feature]]\nname = "x"\ncolumns = ["C1", "C2"]\nops = [{ op = "hash" }]', r"first op must be cross"),
        ('[[feature]]\nname = "x"\ncolumns = ["C1", "C2"]', r"columns: given without ops"),
        ('[[feature]]\nname = "x"\nbucket = 9\nops = [{ op = "hash" }]', r"bucket: not with ops"),
        ('[[feature]]\nname = "x"\nops = [{ op = "mod", mod = 0 }]', r"mod must be an int in \[1, 2\*\*64\)"),
    ],
)
def test_malformed_chains_are_refused_at_load(tmp_path, features, message):
    (tmp_path / "job.toml").write_text(JOB.format(features=features))
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "job.toml"))


def test_a_string_column_crossed_needs_hash_and_works_with_it(tmp_path, data_dir):
    t = po.read_table(data_dir / "data" / "part-00000.orc").slice(0, 600)
    words = pa.array([f"w{i % 13}" for i in range(t.num_rows)])
    t = t.append_column("word", words)
    (tmp_path / "d").mkdir()
    po.write_table(t, tmp_path / "d" / "part-00000.orc")
    po.write_table(t, tmp_path / "d" / "part-00001.orc")
    feats = '[[feature]]\nname = "wx"\ncolumns = ["word", "C1"]\nops = [{ op = "cross", bucket = 100 }]\n'
    text = JOB.format(features=feats).replace("data/", "d/")
    (tmp_path / "job.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"column 'word' holds strings \(set hash = true"):
        Job(load_config(str(tmp_path / "job.toml")))
    (tmp_path / "job.toml").write_text(text.replace('name = "wx"', 'name = "wx"\nhash = true'))
    job = Job(load_config(str(tmp_path / "job.toml")))
    out = job.pipeline(next(iter(job.eval_dataset)))
    assert isinstance(out["wx"], RaggedTensor) and int(out["wx"].values.max()) < 100
