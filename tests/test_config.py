"""`recis train --config` / `eval` / `inspect`, and bad configs."""

import json
import re
from dataclasses import fields

import pyarrow as pa
import pyarrow.orc as po
import pytest

from recis import config as cfgmod
from recis.cli import main
from recis.config import ConfigError, load_config
from recis.datagen import generate

CONFIG = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc"]
eval = ["data/part-00002.orc"]
dense = ["I1", "I2", "I3"]
dense_transform = "log1p"
batch_size = 512

[model]
name = "{model}"
dim = 8

[[feature]]
name = "C1"
[[feature]]
name = "C2"
combiner = "mean"
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
log_every_steps = 5
save_every_steps = 20
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    generate(str(d / "data"), 15000, files=3, vocab=3000, seed=0)
    return d


def write(d, text, name="job.toml"):
    (d / name).write_text(text)
    return str(d / name)


@pytest.mark.parametrize("model", ["deepfm", "dlrm", "dcnv2", "wide_deep"])
def test_train_eval_inspect_and_resume(data_dir, model, capsys, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "data").symlink_to(data_dir / "data")
    path = write(job, CONFIG.format(model=model))
    assert main(["train", "--config", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"eval: AUC 0\.\d+", out), out
    ckpt = job / "out" / "checkpoints"
    assert main(["eval", "--config", path]) == 0
    assert "auc" in capsys.readouterr().out
    assert main(["inspect", str(ckpt)]) == 0
    listing = capsys.readouterr().out
    for table in ("C1", "C2", "c34"):
        assert re.search(rf"^\s+{table}\s+[\d,]+ rows", listing, re.M), listing
    assert "C3" not in listing.split("dense tensors")[0]  # C3 and C4 share c34
    steps = int(re.search(r"step (\d+)", listing).group(1))
    # A second run resumes from the checkpoint at the end: no more steps.
    assert main(["train", "--config", path]) == 0
    assert f"resumed from {ckpt}/ckpt-{steps} at step {steps}" in capsys.readouterr().out


def test_every_field_is_documented():
    doc = cfgmod.__doc__
    for cls, section in [
        (cfgmod.DataConfig, "[data]"),
        (cfgmod.FeatureConfig, "[[feature]]"),
        (cfgmod.OptimizerConfig, "[optimizer]"),
        (cfgmod.TrainerConfig, "[trainer]"),
    ]:
        part = doc.split(section, 1)[1].split("\n[", 1)[0]
        for f in fields(cls):
            assert re.search(rf"^{f.name} = ", part, re.M), (section, f.name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (("epochs = 1", "epoch = 1"), r"\[trainer\]: unknown field\(s\) \['epoch'\]"),
        (("[optimizer]", "[optimiser]"), r"unknown section\(s\) \['optimiser'\]"),
        (("batch_size = 512", 'batch_size = "512"'), r"\[data\].batch_size: expected int"),
        (('name = "C1"', 'name = "C1"\ncolour = 1'), r"\[\[feature\]\] #1 \(C1\): unknown field\(s\) \['colour'\]"),
        (("dim = 8", "dim = 8\nhiden = [3]"), r"\[model\] unknown field\(s\) \['hiden'\]"),
        (('output_dir = "out"', ""), r"\[trainer\]: missing required field\(s\) \['output_dir'\]"),
        (('combiner = "mean"', 'combiner = "max"'), r"C2\)\.combiner: 'max' is not one of"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, edit, message):
    text = CONFIG.format(model="deepfm").replace("log_every_steps = 5", "log_every_steps = 5\nepochs = 1")
    path = write(tmp_path, text.replace(*edit, 1))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_column_bad_labels_and_foreign_checkpoint(data_dir, tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    (job / "data").symlink_to(data_dir / "data")
    text = CONFIG.format(model="deepfm")
    path = write(job, text.replace('name = "C1"', 'name = "C1"\ncolumn = "C99"'))
    assert main(["train", "--config", path]) == 1
    err = capsys.readouterr().err
    assert "part-00000.orc" in err and 'column "C99" not found' in err, err
    # Train once, then point a config with other features at its checkpoints.
    path = write(job, text)
    assert main(["train", "--config", path]) == 0
    ckpt_dir = job / "out" / "checkpoints"
    before = sorted(p.name for p in ckpt_dir.iterdir())
    meta = json.loads((ckpt_dir / before[0] / "meta.json").read_text()) if before[0].startswith("ckpt") else None
    # A config whose features are all others: refused, nothing touched.
    foreign = text
    for k in (1, 2, 3, 4):
        foreign = foreign.replace(f'name = "C{k}"', f'name = "C{k}"\ncolumn = "C{k + 4}"').replace(
            f'name = "C{k}"', f'name = "X{k}"'
        )
    foreign = foreign.replace('shared = "c34"', 'shared = "x34"')
    assert main(["train", "--config", write(job, foreign, "foreign.toml")]) == 1
    assert "none of them: a checkpoint of another model?" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before
    if meta is not None:
        assert json.loads((ckpt_dir / before[0] / "meta.json").read_text()) == meta
    # Labels outside {0, 1}.
    bad = tmp_path / "bad"
    bad.mkdir()
    t = po.read_table(data_dir / "data" / "part-00000.orc")
    t = t.set_column(t.column_names.index("label"), "label", pa.array([2] * t.num_rows))
    po.write_table(t, bad / "part-00000.orc")
    path = write(
        bad,
        text.replace('"data/part-00000.orc", "data/part-00001.orc"', '"part-00000.orc"').replace(
            'eval = ["data/part-00002.orc"]', ""
        ),
    )
    assert main(["train", "--config", path]) == 1
    assert "label column 'label': value 2" in capsys.readouterr().err


def one_file_job(d, table, extra=""):
    """CONFIG on one file holding ``table``, no evaluation; ``extra``: more [data] fields."""
    po.write_table(table, d / "part-00000.orc")
    text = CONFIG.format(model="deepfm").replace('"data/part-00000.orc", "data/part-00001.orc"', '"part-00000.orc"')
    return write(d, text.replace('eval = ["data/part-00002.orc"]', extra))


def test_inf_in_a_dense_column_stops_training_naming_file_column_and_row(data_dir, tmp_path, capsys):
    t = po.read_table(data_dir / "data" / "part-00000.orc")
    i2 = t.column("I2").to_pylist()
    i2[321] = float("inf")
    t = t.set_column(t.column_names.index("I2"), "I2", pa.array(i2, pa.float32()))
    path = one_file_job(tmp_path, t)
    assert main(["train", "--config", path]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'part-00000.orc'}, row 321: column 'I2': inf is not a finite number" in err, err
    assert not (tmp_path / "out" / "checkpoints" / "latest").exists()  # stopped before any step was saved
    # Asked for, the old behaviour: clamped to float32's largest, then log1p.
    (tmp_path / "clamp").mkdir()
    assert main(["train", "--config", one_file_job(tmp_path / "clamp", t, 'non_finite = "clamp"')]) == 0
    # A finite float64 value beyond float32's range would become inf in the dense input.
    t = po.read_table(data_dir / "data" / "part-00000.orc")
    i3 = t.column("I3").to_pylist()
    i3[10] = 1e39
    t = t.set_column(t.column_names.index("I3"), "I3", pa.array(i3, pa.float64()))
    (tmp_path / "wide").mkdir()
    # Named by the reader with its file and row, rows shuffled or not.
    for shuffle in ("true", "false"):
        (tmp_path / "wide" / shuffle).mkdir(parents=True)
        assert main(["train", "--config", one_file_job(tmp_path / "wide" / shuffle, t, f"shuffle = {shuffle}")]) == 1
        err = capsys.readouterr().err
        want = f"{tmp_path / 'wide' / shuffle / 'part-00000.orc'}, row 10: column 'I3': 1e+39 is beyond float32's range"
        assert want in err, err
    (tmp_path / "zero").mkdir()
    assert main(["train", "--config", one_file_job(tmp_path / "zero", t, 'non_finite = "zero"')]) == 0


def test_bad_non_finite_option_names_the_field(tmp_path):
    path = write(
        tmp_path, CONFIG.format(model="deepfm").replace("batch_size = 512", 'batch_size = 512\nnon_finite = "nan"')
    )
    with pytest.raises(ConfigError, match=r"\[data\].non_finite: 'nan' is not one of \['error', 'clamp', 'zero'\]"):
        load_config(path)


def test_shuffle_buffer_reaches_the_dataset(tmp_path):
    from recis.config import Job

    generate(str(tmp_path / "data"), 600, files=3, vocab=100, seed=0)
    path = write(tmp_path, CONFIG.format(model="deepfm"))
    assert load_config(path).data.shuffle_buffer == 1 << 20
    assert Job(load_config(path)).train_dataset.shuffle_buffer == 1 << 20
    path = write(
        tmp_path, CONFIG.format(model="deepfm").replace("batch_size = 512", "batch_size = 8\nshuffle_buffer = 64")
    )
    ds = Job(load_config(path)).train_dataset
    assert ds.shuffle_buffer == 64 and ds.state_dict()["shuffle_buffer"] == 64
    bad = write(tmp_path, CONFIG.format(model="deepfm").replace("batch_size = 512", "shuffle_buffer = -1"))
    with pytest.raises(ConfigError, match=r"\[data\].shuffle_buffer: must be >= 0 rows, got -1"):
        load_config(bad)


def test_collective_timeout_reaches_the_trainer(tmp_path):
    from recis.config import Job

    path = write(tmp_path, CONFIG.format(model="deepfm").replace("save_every_steps = 20", "collective_timeout = 45"))
    assert load_config(path).trainer.collective_timeout == 45
    generate(str(tmp_path / "data"), 600, files=3, vocab=100, seed=0)
    job = Job(load_config(path), for_training=False)
    assert job.args.collective_timeout == 45
    bad = write(tmp_path, CONFIG.format(model="deepfm").replace("save_every_steps = 20", "collective_timeout = -1"))
    with pytest.raises(ConfigError, match=r"\[trainer\].collective_timeout: must be >= 0 seconds, got -1"):
        load_config(bad)


@pytest.mark.parametrize("model", ["deepfm", "dlrm"])
def test_model_dropout_and_batch_norm(tmp_path, model, capsys):
    import torch

    from recis.config import Job

    doc = cfgmod.__doc__.split("[model]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^dropout = 0\.0 ", doc, re.M) and re.search(r"^batch_norm = false ", doc, re.M)
    generate(str(tmp_path / "data"), 600, files=3, vocab=100, seed=0)
    text = CONFIG.format(model=model).replace("dim = 8", "dim = 8\ndropout = 0.1\nbatch_norm = true")
    text = text.replace("batch_size = 512", "batch_size = 64").replace("save_every_steps = 20", "max_steps = 4")
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert cfg.model["dropout"] == 0.1 and cfg.model["batch_norm"] is True
    job = Job(cfg)
    layers = [m for m in job.model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.BatchNorm1d))]
    assert {type(m) for m in layers} == {torch.nn.Dropout, torch.nn.BatchNorm1d}
    assert all(m.p == 0.1 for m in layers if isinstance(m, torch.nn.Dropout))
    assert main(["train", "--config", path, "--print-config"]) == 0
    printed = capsys.readouterr().out.split("[model]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^dropout = 0\.1$", printed, re.M) and re.search(r"^batch_norm = true$", printed, re.M)
    # Trains (the Trainer: model.train()), evaluates (model.eval()) and
    # records both in the checkpoint's model spec.
    assert main(["train", "--config", path]) == 0
    assert re.search(r"eval: AUC 0\.\d+", capsys.readouterr().out)
    meta = json.loads((tmp_path / "out" / "checkpoints" / "ckpt-4" / "meta.json").read_text())
    args = meta["extra"]["model_spec"]["args"]
    assert args["dropout"] == 0.1 and args["batch_norm"] is True
    assert main(["eval", "--config", path]) == 0
    # Defaults: the printed config spells them out.
    plain = write(tmp_path, CONFIG.format(model=model), "plain.toml")
    assert main(["train", "--config", plain, "--print-config"]) == 0
    printed = capsys.readouterr().out.split("[model]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^dropout = 0\.0$", printed, re.M) and re.search(r"^batch_norm = false$", printed, re.M)
    # Bad values: the job names [model], the model and the argument.
    for bad, message in [
        ("dropout = 1.0", r"dropout must be a number in \[0, 1\), got 1\.0"),
        ('batch_norm = "yes"', r"batch_norm must be a bool, got 'yes'"),
    ]:
        path = write(tmp_path, CONFIG.format(model=model).replace("dim = 8", f"dim = 8\n{bad}"), "bad.toml")
        with pytest.raises(ConfigError, match=rf"\[model\] \({model}\): \w+: {message}"):
            Job(load_config(path))
