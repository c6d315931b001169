"""A job's validation set from its config: `[data] valid`, `[trainer]
eval_every`, early stopping and the best checkpoint; `recis eval --data`
and `--checkpoint best`, whose record never lands in the training log."""

import json

import pyarrow.orc as po
import pytest

from recis.cli import main
from recis.config import ConfigError, load_config
from recis.datagen import generate

JOB = """
[data]
train = ["data/part-00000.orc"]
valid = ["data/part-00001.orc"]
eval = ["data/part-00002.orc"]
dense = ["I1", "I2"]
dense_transform = "log1p"
batch_size = 256

[model]
name = "deepfm"
dim = 8
hidden = [32]

[[feature]]
name = "C1"
[[feature]]
name = "C2"
[[feature]]
name = "C3"

[optimizer]
sparse_lr = 0.05
dense_lr = 0.01

[trainer]
output_dir = "out"
epochs = {epochs}
eval_every = "epoch"
early_stopping_patience = {patience}
keep_checkpoints = 1
load_best_at_end = true
log_every_steps = 1000
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    generate(str(d / "data"), 6000, files=3, vocab=400, seed=3)
    return d


def job_dir(tmp_path, data_dir, text):
    job = tmp_path / "job"
    job.mkdir()
    (job / "data").symlink_to(data_dir / "data")
    (job / "job.toml").write_text(text)
    return job, str(job / "job.toml")


def records(path, key):
    with open(path) as f:
        return [r for r in map(json.loads, f) if key in r]


def test_validation_early_stopping_best_checkpoint_and_eval_data(data_dir, tmp_path, capsys):
    job, path = job_dir(tmp_path, data_dir, JOB.format(epochs=8, patience=2))
    assert main(["train", "--config", path]) == 0
    out = capsys.readouterr().out
    log = job / "out" / "log.jsonl"
    valid = records(log, "valid")
    assert valid, out
    aucs = [r["valid"]["auc"] for r in valid]
    # The stop and the best follow from the logged curve alone.
    best_i, bad, stop = 0, 0, None
    for i, v in enumerate(aucs):
        if v > aucs[best_i]:
            best_i, bad = i, 0
        elif i:
            bad += 1
        if bad >= 2:
            stop = i
            break
    if stop is None:  # trained every epoch: 8 validations, the last at the end
        assert len(aucs) == 8, aucs
    else:
        assert len(aucs) == stop + 1, (aucs, stop)
        assert "early stopping at step" in out, out
        assert records(log, "early_stopping")
    best_step = valid[best_i]["valid"]["step"]
    pointer = json.loads((job / "out" / "checkpoints" / "best").read_text())
    assert pointer["checkpoint"] == f"ckpt-{best_step}" and pointer["metric"] == "auc"
    assert pointer["value"] == pytest.approx(aucs[best_i])
    kept = sorted(p.name for p in (job / "out" / "checkpoints").iterdir() if p.name.startswith("ckpt-"))
    last_step = valid[-1]["valid"]["step"]
    # keep_checkpoints = 1 keeps the latest (the resume point) and the best.
    assert kept == sorted({f"ckpt-{best_step}", f"ckpt-{last_step}"}), kept
    # The final test evaluation is of the best checkpoint's model.
    (final,) = records(log, "eval")
    if best_step != last_step:
        assert final.get("model_step") == best_step, final
    assert "loaded the best checkpoint" in out or best_step == last_step, out

    # recis eval: the best checkpoint on explicit data, its own record.
    lines = log.read_text().splitlines()
    rec = tmp_path / "test.json"
    test_file = str(data_dir / "data" / "part-00002.orc")
    args = ["eval", "--config", path, "--checkpoint", "best", "--data", test_file, "-o", str(rec)]
    assert main(args) == 0
    got = json.loads(rec.read_text())
    assert got["step"] == best_step and got["data"] == [test_file]
    assert got["metrics"]["auc"] == pytest.approx(final["eval"]["auc"], abs=1e-6)
    assert got["rows"] == po.ORCFile(test_file).nrows
    # On the validation data, the best checkpoint scores what its validation logged.
    valid_file = str(data_dir / "data" / "part-00001.orc")
    assert main(["eval", "--config", path, "--checkpoint", "best", "--data", valid_file]) == 0
    (again,) = [json.loads(x) for x in (job / "out" / "eval.jsonl").read_text().splitlines()]
    assert again["metrics"]["auc"] == pytest.approx(aucs[best_i], abs=1e-6)
    assert log.read_text().splitlines() == lines  # nothing written into the training log

    # A resume after the stop trains no further.
    capsys.readouterr()
    if stop is not None:
        assert main(["train", "--config", path]) == 0
        assert "nothing more to train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "edit, message",
    [
        (('eval_every = "epoch"', 'eval_every = "week"'), r"\[trainer\].eval_every: a number of steps >= 0"),
        (('eval_every = "epoch"', "eval_every = -1"), r"\[trainer\].eval_every: a number of steps >= 0"),
        (('eval_every = "epoch"', "eval_every = 0"), r"early_stopping_patience needs a periodic validation"),
        (('valid = ["data/part-00001.orc"]', ""), r"early_stopping_patience needs a validation set"),
        (("load_best_at_end = true", 'metric_for_best = "gauc"'), r'"gauc" needs \[data\].group'),
        (("load_best_at_end = true", 'metric_for_best = "acc"'), r"metric_for_best: 'acc' is not one of"),
        (("load_best_at_end = true", "eval_every_steps = 5"), r"disagree"),
    ],
)
def test_bad_validation_settings_are_refused_at_load(tmp_path, edit, message):
    (tmp_path / "job.toml").write_text(JOB.format(epochs=2, patience=1).replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "job.toml"))


def test_eval_every_steps_is_the_older_name(tmp_path):
    text = JOB.format(epochs=2, patience=0).replace('eval_every = "epoch"', "eval_every_steps = 7")
    (tmp_path / "job.toml").write_text(text)
    assert load_config(str(tmp_path / "job.toml")).trainer.eval_every == 7


def test_a_validation_set_missing_a_column_is_refused_before_training(data_dir, tmp_path, capsys):
    t = po.read_table(data_dir / "data" / "part-00001.orc")
    (tmp_path / "v").mkdir()
    po.write_table(t.drop(["C2"]), tmp_path / "v" / "part.orc")
    job, path = job_dir(tmp_path, data_dir, JOB.format(epochs=1, patience=1))
    text = (job / "job.toml").read_text().replace("data/part-00001.orc", str(tmp_path / "v" / "part.orc"))
    (job / "job.toml").write_text(text)
    assert main(["train", "--config", path]) == 1
    err = capsys.readouterr().err
    assert "part.orc" in err and "C2" in err, err
    assert not (job / "out" / "checkpoints").exists() or not any((job / "out" / "checkpoints").iterdir())


def test_batch_norm_and_a_one_row_last_batch(data_dir, tmp_path, capsys):
    """2000 rows in batches of 1999: the last batch is one row, which batch
    norm cannot train on; named, and drop_remainder drops it."""
    text = JOB.format(epochs=1, patience=0).replace("batch_size = 256", "batch_size = 1999")
    text = text.replace("hidden = [32]", "hidden = [32]\nbatch_norm = true")
    text = text.replace("load_best_at_end = true", "")
    job, path = job_dir(tmp_path, data_dir, text)
    assert main(["train", "--config", path]) == 1
    assert "a training batch of one row at step 2" in capsys.readouterr().err
    (job / "job.toml").write_text(text.replace("batch_size = 1999", "batch_size = 1999\ndrop_remainder = true"))
    assert main(["train", "--config", path, "--set", "trainer.resume=false"]) == 0
