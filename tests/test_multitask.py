"""Multi-task training (issue #15): `recis datagen --tasks 2`, the
Shared-Bottom, MMoE and ESMM models learning both tasks, per-task metrics
against scikit-learn's, named label errors, `[data] labels` /
`[trainer] task_weights` in configs, resume, serving exports and `recis
predict` with per-task scores, and validation by a task's metric."""

import hashlib
import json
import re

import numpy as np
import pyarrow
import pyarrow.orc as po
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recis.cli import main
from recis.config import ConfigError, Job, dump_config, load_config
from recis.datagen import DENSE_COLUMNS, SPARSE_FIELDS, generate
from recis.framework import Trainer, TrainingArguments, TrainingError
from recis.io import OrcDataset
from recis.io.pipeline import FeatureInput, InputPipeline
from recis.models import ESMM, MULTITASK_MODELS, MMoE, SharedBottom, build_model, model_spec
from recis.optim import SparseAdam
from recis.serving import Predictor, export_checkpoint

TASKS = ["label", "conversion"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multitask")
    generate(str(d / "data"), 24000, files=4, vocab=300, seed=1, tasks=2)
    return d


def files(data_dir):
    return sorted(str(p) for p in (data_dir / "data").iterdir())


# -- datagen ------------------------------------------------------------------

# generate(out, 3000, files=2, vocab=500, seed=7) before --tasks existed:
# each file's (sha256 of its bytes, sha256 of its columns' names, types and
# values). The bytes are pyarrow 26.0.1's ORC writer's.
BEFORE = {
    "part-00000.orc": (
        "be8b8e4c7f808c74fa442322de9f4d349bf33e61287b5e7c2cf686a1ff415de4",
        "2c99834d6cd744f95f16b6e27340ca66d6180d04266f07f0bc87029fe66dff8a",
    ),
    "part-00001.orc": (
        "2dfa9692720a4d1e5679edfe1483fe128d9d46c8006cf67b03549c516636226c",
        "ac0d61d3879ae68108715d41e18da68c6600fb088ae4d6b3f0c70e27aeca6b64",
    ),
}


def content_digest(table) -> str:
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        h.update(str(table.schema.field(name).type).encode())
        h.update(repr(table.column(name).to_pylist()).encode())
    return h.hexdigest()


def test_datagen_default_is_unchanged_and_tasks_2_adds_a_nested_conversion(tmp_path, capsys):
    paths = generate(str(tmp_path / "one"), 3000, files=2, vocab=500, seed=7)
    for p in paths:
        name = p.rsplit("/", 1)[1]
        raw, content = BEFORE[name]
        assert content_digest(po.read_table(p)) == content, name
        if pyarrow.__version__ == "26.0.1":
            assert hashlib.sha256(open(p, "rb").read()).hexdigest() == raw, name
    assert main(["datagen", "-o", str(tmp_path / "two"), "--rows", "3000", "--files", "2", "--vocab", "500"] +
                ["--seed", "7", "--tasks", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    for p in paths:
        one = po.read_table(p)
        two = po.read_table(str(tmp_path / "two" / p.rsplit("/", 1)[1]))
        assert two.column_names == ["label", "conversion", *one.column_names[1:]]
        # The click columns are the default's; conversion only where clicked.
        assert content_digest(two.drop(["conversion"])) == content_digest(one)
        click, conv = two["label"].to_numpy(), two["conversion"].to_numpy()
        assert set(np.unique(conv)) <= {0, 1} and not ((conv == 1) & (click == 0)).any()
        assert 0.3 < conv[click == 1].mean() < 0.7, conv[click == 1].mean()
    with pytest.raises(ValueError, match="tasks must be 1"):
        generate(str(tmp_path / "bad"), 10, tasks=3)


# -- the models learn both tasks; metrics are sklearn's -------------------------

MODELS_SMALL = {
    "shared_bottom": dict(bottom=(64,), tower=(32,)),
    "mmoe": dict(num_experts=3, expert=(64,), tower=(16,)),
    "esmm": dict(ctr_tower=(64,), cvr_tower=(64,)),
}


def pipeline():
    return InputPipeline(
        features=[FeatureInput(f, f) for f in SPARSE_FIELDS], labels=list(TASKS), dense=list(DENSE_COLUMNS)
    )


def probabilities(model, ds, pipe):
    model.eval()
    ps, ys = [], []
    with torch.no_grad():
        for batch in ds:
            ps.append(torch.sigmoid(model(pipe(batch)).float()))
            ys.append(torch.stack([batch[t].float() for t in TASKS], dim=1))
    return torch.cat(ps).numpy().astype(np.float64), torch.cat(ys).numpy()


@pytest.mark.parametrize("name", sorted(MULTITASK_MODELS))
def test_each_model_learns_both_tasks_and_metrics_are_sklearns(name, data_dir, tmp_path):
    torch.manual_seed(0)
    model = MULTITASK_MODELS[name](SPARSE_FIELDS, num_dense=13, dim=4, **MODELS_SMALL[name])
    pipe = pipeline()
    paths = files(data_dir)
    train = OrcDataset(paths[:3], 512, pipe.columns(), shuffle=True, seed=0)
    held_out = OrcDataset(paths[3:], 1000, pipe.columns())
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), epochs=2, log_every_steps=20, label_keys=TASKS, tensorboard=True, plot=False
    )
    trainer = Trainer(
        model,
        args,
        train,
        held_out,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        sparse_optimizer=SparseAdam(model, lr=2e-2),
        input_fn=pipe,
    )
    ev = trainer.train()["eval"]
    p, y = probabilities(model, held_out, pipe)
    clicked = y[:, 0] == 1
    cvr = p[clicked, 1] / p[clicked, 0]  # pCTCVR / pCTR: the conversion probability given a click
    cvr_auc = roc_auc_score(y[clicked, 1], cvr)
    print(f"{name}: auc_label {ev['auc_label']:.4f}  auc_conversion {ev['auc_conversion']:.4f}  "
          f"cvr auc on clicks {cvr_auc:.4f}")  # fmt: skip
    # Both tasks learnt: the click AUC, the click-and-conversion AUC, and
    # (the conversion is not just the click) the conversion AUC among clicks.
    assert ev["auc_label"] > 0.7 and ev["auc_conversion"] > 0.7, ev
    assert cvr_auc > 0.6, cvr_auc
    # Per-task metrics: sklearn's on the same predictions; the plain names
    # are the first task's.
    for t, task in enumerate(TASKS):
        assert ev[f"auc_{task}"] == pytest.approx(roc_auc_score(y[:, t], p[:, t]), abs=1e-6)
        assert ev[f"log_loss_{task}"] == pytest.approx(log_loss(y[:, t], p[:, t]), abs=1e-5)
        assert ev[f"calibration_{task}"] == pytest.approx(p[:, t].sum() / y[:, t].sum(), rel=1e-5)
    for k in ("auc", "log_loss", "calibration"):
        assert ev[k] == ev[f"{k}_label"]
    # The log: each task's training loss, and the per-task evaluation.
    log = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps and all({"loss_label", "loss_conversion"} <= set(r) for r in steps)
    # The loss is the (weight 1) sum of the tasks'.
    assert all(r["loss"] == pytest.approx(r["loss_label"] + r["loss_conversion"], rel=1e-5) for r in steps)
    (evals,) = [r["eval"] for r in log if "eval" in r]
    assert evals["auc_conversion"] == ev["auc_conversion"]
    # TensorBoard: the per-task scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "out" / "tensorboard").iterdir()
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_label", "train/loss_conversion", "eval/auc_label", "eval/auc_conversion", "eval/auc"} <= tags
    # The spec rebuilds the model (serving).
    rebuilt = build_model(json.loads(json.dumps(model_spec(model))))
    assert type(rebuilt) is type(model) and rebuilt.num_tasks == 2


def test_task_weights_weigh_the_loss(tmp_path):
    torch.manual_seed(0)
    fields = ["C1", "C2"]
    model = SharedBottom(fields, dim=4, bottom=(8,), tower=(4,))
    batch = {
        "C1": torch.tensor([[1], [2], [3], [4]]),
        "C2": torch.tensor([[5], [6], [7], [8]]),
        "click": torch.tensor([1, 0, 1, 0]),
        "buy": torch.tensor([1, 0, 0, 0]),
    }
    args = TrainingArguments(
        output_dir=str(tmp_path), label_keys=["click", "buy"], task_weights=[1.0, 0.25], plot=False, tensorboard=False
    )
    trainer = Trainer(model, args, [batch])
    loss = trainer._loss(batch)
    logits = model(batch)
    y = torch.stack([batch["click"], batch["buy"]], 1).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = bce(logits[:, 0], y[:, 0]) + 0.25 * bce(logits[:, 1], y[:, 1])
    torch.testing.assert_close(loss, want)
    assert args.label_key == "click"
    for kw, message in [
        (dict(label_keys=["a"], task_weights=[1.0, 2.0]), "1 tasks"),
        (dict(task_weights=[1.0]), "needs label_keys"),
        (dict(label_keys=["a", "b"], task_weights=[0, 0]), "all 0"),
        (dict(label_keys=["a", "b"], task_weights=[1, -1]), ">= 0"),
        (dict(label_keys=["a", "a"]), "distinct"),
        (dict(label_keys=["a"], label_key="b"), "label_key='b'"),
        (dict(label_keys=["a", "b"], metric_for_best="auc_c"), "metric_for_best must be one of"),
        (dict(label_keys=["a", "b"], metric_for_best="gauc_b"), "needs group_key"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainingArguments(output_dir=str(tmp_path), **kw)
    assert TrainingArguments(output_dir=str(tmp_path), label_keys=["a", "b"], metric_for_best="log_loss_b")


# -- named label errors ---------------------------------------------------------


def toy(n=8, **labels):
    g = torch.Generator().manual_seed(0)
    out = {"C1": torch.randint(0, 50, (n, 1), generator=g), "C2": torch.randint(0, 50, (n, 1), generator=g)}
    out.update({k: torch.tensor(v) for k, v in labels.items()})
    return out


def toy_trainer(tmp_path, model, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), label_keys=["click", "conversion"], plot=False, tensorboard=False, progress=False
    )
    return Trainer(model, args, **kw)


def test_a_bad_label_of_the_second_task_is_a_named_error(tmp_path):
    click = [1, 0, 1, 0, 1, 1, 0, 0]
    good = toy(click=click, conversion=[1, 0, 0, 0, 1, 0, 0, 0])
    bad = toy(click=click, conversion=[1, 0, 0, 2, 1, 0, 0, 0])
    model = MMoE(["C1", "C2"], dim=4, num_experts=2, expert=(8,), tower=(4,))
    trainer = toy_trainer(tmp_path / "a", model, train_dataset=[good, bad])
    with pytest.raises(TrainingError, match=r"task 'conversion' \(label column 'conversion', task 2 of .*value 2 "
                       r"\(row 3 of a batch\) at step 2 is not 0 or 1"):  # fmt: skip
        trainer.train()
    assert trainer.global_step == 1  # the bad batch updated nothing
    missing = toy(click=click)
    with pytest.raises(TrainingError, match=r"task 'conversion'.*the batch has no column 'conversion'"):
        toy_trainer(tmp_path / "b", model, train_dataset=[missing]).train()
    # In evaluation too.
    with pytest.raises(TrainingError, match=r"task 'conversion'.*value 2 .*in evaluation"):
        toy_trainer(tmp_path / "c", model, train_dataset=[good], eval_dataset=[bad]).train()
    # ESMM: the second label (click AND conversion) is never 1 without a click.
    esmm = ESMM(["C1", "C2"], dim=4, ctr_tower=(8,), cvr_tower=(8,))
    unnested = toy(click=click, conversion=[1, 1, 0, 0, 0, 0, 0, 0])
    with pytest.raises(TrainingError, match=r"task 'conversion'.*1 at row 1 of a batch at step 1 where task 'click'"):
        toy_trainer(tmp_path / "d", esmm, train_dataset=[unnested]).train()
    toy_trainer(tmp_path / "e", esmm, train_dataset=[good]).train()  # nested: trains
    # A model whose output is not [B, T].
    from recis.models import DeepFM

    with pytest.raises(TrainingError, match=r"label_keys names 2 tasks .* logits of shape \[8\]"):
        toy_trainer(tmp_path / "f", DeepFM(["C1", "C2"], dim=4, hidden=(4,)), train_dataset=[good]).train()


def test_evaluate_model_per_task_and_gauc():
    from recis.framework.trainer import evaluate_model
    from recis.metrics import GAUC

    torch.manual_seed(0)
    model = SharedBottom(["C1", "C2"], dim=4, bottom=(8,), tower=(4,))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        b = toy(64)
        b["click"] = torch.randint(0, 2, (64,), generator=g)
        b["buy"] = b["click"] * torch.randint(0, 2, (64,), generator=g)
        b["uid"] = torch.randint(0, 6, (64,), generator=g)
        batches.append(b)
    m = evaluate_model(model, batches, label_keys=["click", "buy"], group_key="uid")
    with torch.no_grad():
        p = torch.cat([torch.sigmoid(model(b)) for b in batches])
    y = torch.cat([torch.stack([b["click"], b["buy"]], 1) for b in batches]).float()
    uid = torch.cat([b["uid"] for b in batches])
    for t, task in enumerate(["click", "buy"]):
        assert m[f"auc_{task}"] == pytest.approx(roc_auc_score(y[:, t].numpy(), p[:, t].numpy()), abs=1e-6)
        gauc = GAUC()
        gauc.update(y[:, t], p[:, t], uid)
        assert m[f"gauc_{task}"] == pytest.approx(gauc.compute(), abs=1e-9)
    assert m["gauc"] == m["gauc_click"] and m["auc"] == m["auc_click"]


@pytest.mark.parametrize("name", sorted(MULTITASK_MODELS))
def test_dropout_and_batch_norm_in_the_multitask_models(name):
    from torch import nn

    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    plain = MULTITASK_MODELS[name](["C1", "C2"], dim=4, **MODELS_SMALL[name])
    assert not kinds(plain) & {nn.Dropout, nn.BatchNorm1d}
    reg = MULTITASK_MODELS[name](["C1", "C2"], dim=4, dropout=0.2, batch_norm=True, **MODELS_SMALL[name])
    assert {nn.Dropout, nn.BatchNorm1d} <= kinds(reg)
    spec = json.loads(json.dumps(model_spec(reg)))
    assert spec["args"]["dropout"] == 0.2 and spec["args"]["batch_norm"] is True
    layers = lambda m: [(n, repr(x)) for n, x in m.named_modules() if n]  # noqa: E731
    assert layers(build_model(spec)) == layers(reg)
    # Every output layer (a tower's last Linear, MMoE's gates) is neither normed nor dropped.
    towers = list(reg.towers) if hasattr(reg, "towers") else [reg.ctr, reg.cvr]
    assert all(isinstance(t[-1], nn.Linear) and t[-1].out_features == 1 for t in towers)
    with pytest.raises(ValueError, match=f"{type(plain).__name__}: dropout must be"):
        MULTITASK_MODELS[name](["C1"], dim=4, dropout=1.0)


def test_esmm_outputs_ctr_and_the_product():
    torch.manual_seed(0)
    model = ESMM(["C1", "C2"], dim=4, ctr_tower=(8,), cvr_tower=(8,)).eval()
    batch = toy(16)
    with torch.no_grad():
        ctr, cvr = model.tower_logits(batch)
        out = model(batch)
    assert out.shape == (16, 2)
    torch.testing.assert_close(torch.sigmoid(out[:, 0]), torch.sigmoid(ctr))
    torch.testing.assert_close(torch.sigmoid(out[:, 1]), torch.sigmoid(ctr) * torch.sigmoid(cvr), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.cvr_probability(batch), torch.sigmoid(cvr))


# -- config, resume, export, predict, validation ---------------------------------

JOB = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc"]
valid = ["data/part-00002.orc"]
eval = ["data/part-00003.orc"]
labels = ["label", "conversion"]
dense = ["I1", "I2", "I3"]
batch_size = 512

[model]
name = "{model}"
dim = 4
{model_args}

{features}

[optimizer]
sparse_lr = 0.02
dense_lr = 0.003

[trainer]
output_dir = "out"
{trainer}
log_every_steps = 5
keep_checkpoints = 2
"""

FEATURES = "\n".join(f'[[feature]]\nname = "{f}"' for f in SPARSE_FIELDS[:12])
ARGS = {
    "mmoe": "num_experts = 2\nexpert = [16]\ntower = [8]",
    "esmm": "ctr_tower = [16]\ncvr_tower = [16]",
    "shared_bottom": "bottom = [16]\ntower = [8]",
}


def job(tmp_path, data_dir, model="mmoe", trainer="max_steps = 6", **edits):
    d = tmp_path / "job"
    d.mkdir(exist_ok=True)
    if not (d / "data").exists():
        (d / "data").symlink_to(data_dir / "data")
    text = JOB.format(model=model, model_args=ARGS[model], features=FEATURES, trainer=trainer)
    for a, b in edits.items():
        text = text.replace(a.replace("__", " "), b)
    (d / "job.toml").write_text(text)
    return d, str(d / "job.toml")


def test_config_labels_and_task_weights_are_checked(tmp_path, data_dir):
    d, path = job(tmp_path, data_dir, trainer="max_steps = 6\ntask_weights = [1.0, 0.5]")
    cfg = load_config(path)
    assert cfg.data.labels == TASKS and cfg.data.label is None and cfg.trainer.task_weights == [1.0, 0.5]
    assert cfg.model["num_tasks"] == 2  # filled in from the labels
    j = Job(cfg)
    assert j.args.label_keys == TASKS and j.args.task_weights == [1.0, 0.5] and j.args.label_key == "label"
    assert j.pipeline.labels == TASKS and [c.name for c in j.pipeline.columns()][:2] == TASKS
    # --print-config round-trips.
    (d / "printed.toml").write_text(dump_config(cfg))
    again = load_config(str(d / "printed.toml"))
    assert (again.data, again.trainer) == (cfg.data, cfg.trainer)
    bad = [
        ({"labels = ": 'label = "label"\nlabels = '}, r"\[data\]: label = 'label' and labels = .*give one"),
        ({"task_weights__= [1.0, 0.5]": "task_weights = [1.0]"}, r"task_weights has 1 weights .* 2 tasks"),
        ({"task_weights__= [1.0, 0.5]": "task_weights = [0.0, 0.0]"}, r"task_weights: numbers >= 0, not all 0"),
        ({"max_steps = 6": 'max_steps = 6\nmetric_for_best = "auc_buy"'}, r"metric_for_best: 'auc_buy' is not one of"),
        ({"max_steps = 6": 'max_steps = 6\nmetric_for_best = "gauc_conversion"'}, r"needs \[data\].group"),
        ({'labels = ["label", "conversion"]': 'labels = ["label", "label"]'}, r"\[data\].labels: distinct"),
        ({'"mmoe"': '"deepfm"', "num_experts = 2\nexpert = [16]\ntower = [8]": ""}, r"is single-task"),
        ({"num_experts = 2": "num_experts = 2\nnum_tasks = 3"}, r"num_tasks = 3 but \[data\].labels names 2"),
    ]
    for edit, message in bad:
        text = (d / "job.toml").read_text()
        for a, b in edit.items():
            text = text.replace(a.replace("__", " "), b)
        (d / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(d / "bad.toml"))
    no_labels = (d / "job.toml").read_text().replace('labels = ["label", "conversion"]\n', "")
    (d / "bad.toml").write_text(no_labels.replace("task_weights = [1.0, 0.5]\n", ""))
    with pytest.raises(ConfigError, match=r"'mmoe' is multi-task: it needs \[data\].labels"):
        load_config(str(d / "bad.toml"))
    _, esmm = job(tmp_path, data_dir, model="esmm", **{'labels = ["label", "conversion"]': 'labels = ["label"]'})
    with pytest.raises(ConfigError, match=r"'esmm' has 2 tasks"):
        load_config(esmm)


@pytest.mark.parametrize("model", ["mmoe", "esmm"])
def test_resume_export_and_predict_give_the_models_per_task_scores(model, tmp_path, data_dir, capsys):
    d, path = job(tmp_path, data_dir, model=model, trainer="max_steps = 6\nsave_every_steps = 3")
    assert main(["train", "--config", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"eval conversion: AUC 0\.\d+", out), out
    assert main(["train", "--config", path, "--set", "trainer.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "at step 6" in out and "resumed from" in out, out
    ckpt = d / "out" / "checkpoints"
    meta = json.loads((ckpt / "ckpt-10" / "meta.json").read_text())
    assert meta["extra"]["model_spec"]["name"] == model and meta["extra"]["pipeline"]["labels"] == TASKS
    assert meta["extra"]["args"]["label_keys"] == TASKS
    # The model's own evaluation of the checkpoint, through the job.
    j = Job(load_config(path), for_training=False)
    j.trainer.checkpoints.load(None, tables=j.trainer.tables, model=j.model, parts=("sparse", "dense"))
    j.trainer.global_step = 10
    want, labels = probabilities(j.model, j.eval_dataset, j.pipeline)
    ev = j.trainer.evaluate(log=False)
    export_checkpoint(str(ckpt), str(tmp_path / "export"))
    predictor = Predictor(str(tmp_path / "export"))
    assert predictor.tasks == TASKS
    test_file = str(data_dir / "data" / "part-00003.orc")
    got = predictor.predict_files([test_file], batch_size=333)
    for t, task in enumerate(TASKS):
        assert np.abs(got[f"score_{task}"] - want[:, t]).max() <= 1e-6
        np.testing.assert_array_equal(got[f"label_{task}"], labels[:, t])
        assert roc_auc_score(labels[:, t], got[f"score_{task}"]) == pytest.approx(ev[f"auc_{task}"], abs=1e-6)
    np.testing.assert_array_equal(got["score"], got["score_label"])
    # recis predict: score and label (the first task's), and a column a task.
    pred = tmp_path / "pred.parquet"
    assert main(["predict", "--export", str(tmp_path / "export"), "--data", test_file, "-o", str(pred)]) == 0
    line = capsys.readouterr().out
    table = pq.read_table(pred)
    columns = ["score", "score_label", "score_conversion", "label", "label_label", "label_conversion"]
    assert table.column_names == columns
    np.testing.assert_allclose(table["score_conversion"].to_numpy(), got["score_conversion"], rtol=0, atol=1e-6)
    auc = float(re.search(r"conversion (0\.\d+)", line).group(1))
    assert auc == pytest.approx(ev["auc_conversion"], abs=1e-4), line
    # recis serve: "scores" the first task's, "task_scores" each task's.
    import io

    from recis.serving.server import ScoringApp

    wanted = {f.column for f in predictor.pipeline.features} | set(predictor.pipeline.dense) | set(TASKS)
    rows = [{k: v for k, v in r.items() if k in wanted} for r in po.read_table(test_file).slice(0, 3).to_pylist()]
    body = json.dumps({"rows": rows}).encode()
    env = {"PATH_INFO": "/predict", "REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(len(body))}
    env["wsgi.input"] = io.BytesIO(body)
    reply = json.loads(ScoringApp(predictor)(env, lambda *a: None)[0])
    assert set(reply["task_scores"]) == set(TASKS)
    np.testing.assert_allclose(reply["scores"], got["score"][:3], rtol=0, atol=1e-6)
    for task in TASKS:
        np.testing.assert_allclose(reply["task_scores"][task], got[f"score_{task}"][:3], rtol=0, atol=1e-6)


def test_validation_picks_the_best_by_a_tasks_metric_and_stops_early(tmp_path, data_dir, capsys):
    trainer = 'epochs = 6\neval_every = "epoch"\nmetric_for_best = "auc_conversion"\nearly_stopping_patience = 1'
    d, path = job(tmp_path, data_dir, model="shared_bottom", trainer=trainer)
    text = (d / "job.toml").read_text().replace("sparse_lr = 0.02", "sparse_lr = 0.2")
    (d / "job.toml").write_text(text)  # a large sparse LR: it overfits within a few epochs
    assert main(["train", "--config", path]) == 0
    out = capsys.readouterr().out
    log = [json.loads(x) for x in (d / "out" / "log.jsonl").read_text().splitlines()]
    valid = [r["valid"] for r in log if "valid" in r]
    assert all(v["auc"] == v["auc_label"] for v in valid)  # "auc": the first task's
    aucs = [v["auc_conversion"] for v in valid]
    best_i, stop = 0, None
    for i, v in enumerate(aucs):
        if v > aucs[best_i]:
            best_i = i
        elif i:
            stop = i  # patience 1
            break
    # With patience 1 and that LR it stops before the 6 epochs (deterministic: seeded data, model, shuffle).
    assert stop is not None and len(aucs) == stop + 1 < 6, aucs
    assert "early stopping at step" in out and "valid auc_conversion has not improved" in out, out
    # curves.png plots a validation curve a task, from these records.
    from recis.framework.curves import read_task_aucs

    tasks = read_task_aucs(str(d / "out" / "log.jsonl"), "valid")
    assert sorted(tasks) == ["conversion", "label"]
    assert [tasks["conversion"][v["step"]] for v in valid] == aucs
    assert (d / "out" / "curves.png").stat().st_size > 0
    pointer = json.loads((d / "out" / "checkpoints" / "best").read_text())
    assert pointer["metric"] == "auc_conversion" and pointer["value"] == pytest.approx(aucs[best_i])
    assert pointer["checkpoint"] == f"ckpt-{valid[best_i]['step']}"
    # Resuming keeps the metric's best (and, after the stop, trains no more).
    assert main(["train", "--config", path]) == 0
    out = capsys.readouterr().out
    if stop is not None:
        assert "nothing more to train" in out, out
