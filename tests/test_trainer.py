"""Trainer: gradient accumulation, exact resume through the ORC reader, NaN stop."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from recis.datagen import DENSE_COLUMNS, SPARSE_FIELDS, generate
from recis.datagen import to_model_input as to_input
from recis.framework import Trainer, TrainingArguments, TrainingError
from recis.framework.scaler import DynamicLossScaler
from recis.io import OrcDataset
from recis.models import DeepFM
from recis.nn import DynamicEmbedding, EmbeddingOption, NormalInit
from recis.optim import SparseAdam

SPARSE, DENSE = SPARSE_FIELDS, DENSE_COLUMNS


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = DynamicEmbedding(EmbeddingOption(dim=4, initializer=NormalInit(0, 0.1), seed=1), "emb")
        self.head = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return self.head(self.emb(batch["ids"])).squeeze(1)


def small_parts():
    torch.manual_seed(0)
    m = Small()
    return m, SparseAdam(m, lr=0.05), torch.optim.Adam(m.head.parameters(), lr=0.05)


def test_k_micro_batches_equal_one_batch_k_times_larger(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 3), generator=g)
    y = (ids[:, 0] % 2).float()
    micro = [{"ids": ids[:32], "label": y[:32]}, {"ids": ids[32:], "label": y[32:]}]
    whole = [{"ids": ids, "label": y}]
    results = []
    for data, k, name in ((micro, 2, "a"), (whole, 1, "b")):
        m, sp, de = small_parts()
        args = TrainingArguments(str(tmp_path / name), max_steps=1, gradient_accumulation_steps=k, resume=False)
        Trainer(m, args, data, dense_optimizer=de, sparse_optimizer=sp).train()
        results.append((m.head.weight.detach().clone(), m.emb.table.embeddings(torch.arange(100))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def orc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    generate(str(d), 6000, files=3, vocab=5000, seed=1)
    return d


def deepfm_parts(orc_dir):
    torch.manual_seed(0)
    m = DeepFM(SPARSE, num_dense=13, dim=8, hidden=(32,), seed=0)
    ds = OrcDataset(str(orc_dir), 500, ["label", *DENSE, *SPARSE], shuffle=True, seed=3)
    return m, ds, SparseAdam(m, lr=0.01), torch.optim.Adam(m.parameters(), lr=0.01)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(orc_dir, tmp_path):
    m, ds, sp, de = deepfm_parts(orc_dir)
    Trainer(
        m,
        TrainingArguments(str(tmp_path / "whole"), max_steps=8),
        ds,
        dense_optimizer=de,
        sparse_optimizer=sp,
        input_fn=to_input,
    ).train()
    # Interrupted after 5 steps (a new process would start like this), then resumed to 8.
    m1, ds1, sp1, de1 = deepfm_parts(orc_dir)
    Trainer(
        m1,
        TrainingArguments(str(tmp_path / "cut"), max_steps=5),
        ds1,
        dense_optimizer=de1,
        sparse_optimizer=sp1,
        input_fn=to_input,
    ).train()
    m2, ds2, sp2, de2 = deepfm_parts(orc_dir)
    t2 = Trainer(
        m2,
        TrainingArguments(str(tmp_path / "cut"), max_steps=8),
        ds2,
        dense_optimizer=de2,
        sparse_optimizer=sp2,
        input_fn=to_input,
    )
    t2.train()
    assert t2.global_step == 8
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    for t, t_other in zip(m.tables(), m2.tables(), strict=True):
        a, b = t.state_dict(), t_other.state_dict()
        oa, ob = torch.argsort(a["ids"]), torch.argsort(b["ids"])
        assert torch.equal(a["ids"][oa], b["ids"][ob]) and torch.equal(a["values"][oa], b["values"][ob])


def test_training_improves_held_out_auc_and_logs(orc_dir, tmp_path):
    m, ds, sp, de = deepfm_parts(orc_dir)
    held = OrcDataset(str(orc_dir), 1000, ["label", *DENSE, *SPARSE])
    args = TrainingArguments(str(tmp_path), epochs=2, log_every_steps=4, resume=False, mixed_precision="bf16")
    logs = Trainer(m, args, ds, held, dense_optimizer=de, sparse_optimizer=sp, input_fn=to_input).train()
    assert logs["eval"]["auc"] > 0.6
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) >= 3


def test_non_finite_loss_stops_with_the_last_good_checkpoint_named(tmp_path):
    m, sp, de = small_parts()
    good = {"ids": torch.tensor([[1, 2]]), "label": torch.tensor([1.0])}
    bad = {"ids": torch.tensor([[1, 2]]), "label": torch.tensor([1.0]), "poison": torch.tensor(float("nan"))}
    args = TrainingArguments(str(tmp_path), max_steps=6, save_every_steps=3, log_every_steps=1, resume=False)

    def loss_fn(logits, batch):  # a NaN loss on the poisoned batch
        return F.binary_cross_entropy_with_logits(logits, batch["label"]) + batch.get("poison", 0.0)

    class Snapshot:
        def on_log(self, trainer, logs):
            self.rows = trainer.model.emb.table.embeddings(torch.tensor([1, 2]))

    snap = Snapshot()
    t = Trainer(
        m, args, [good] * 4 + [bad, good], dense_optimizer=de, sparse_optimizer=sp, loss_fn=loss_fn, hooks=[snap]
    )
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5; .* last good checkpoint is .*ckpt-3"):
        t.train()
    assert t.global_step == 4
    assert torch.equal(m.emb.table.embeddings(torch.tensor([1, 2])), snap.rows)  # the bad step changed nothing
    assert t.checkpoints.load(tables={"emb": Small().emb.table}, parts=("sparse",)) == 3


def test_fresh_run_over_existing_checkpoints_is_refused(tmp_path):
    m, sp, de = small_parts()
    data = [{"ids": torch.tensor([[1]]), "label": torch.tensor([1.0])}]
    Trainer(m, TrainingArguments(str(tmp_path), max_steps=1), data, dense_optimizer=de, sparse_optimizer=sp).train()
    with pytest.raises(TrainingError, match="holds checkpoints but resume=False"):
        Trainer(m, TrainingArguments(str(tmp_path), max_steps=2, resume=False), data, sparse_optimizer=sp).train()


def test_loss_scaling_unscales_dense_and_sparse_gradients_exactly():
    """Power-of-two scaling then unscaling is exact: a scaled run (no
    autocast) equals an unscaled one bit for bit, through an EmbeddingEngine
    whose tables share one gradient block."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(5):
        b = {f: torch.randint(0, 50, (64, 2), generator=g) for f in ("a", "b", "c")}
        b["dense"] = torch.randn(64, 2, generator=g)
        batches.append((b, torch.randint(0, 2, (64,), generator=g).float()))
    results = []
    for scaler in (None, DynamicLossScaler(init_scale=2.0**12)):
        torch.manual_seed(0)
        m = DeepFM(["a", "b", "c"], num_dense=2, dim=4, hidden=(8,))
        sp, de = SparseAdam(m, lr=0.05), torch.optim.Adam(m.parameters(), lr=0.05)
        for b, y in batches:
            loss = F.binary_cross_entropy_with_logits(m(b), y)
            (loss if scaler is None else scaler.scale_loss(loss)).backward()
            if scaler is not None:
                assert scaler.unscale(de, sp)
            sp.step(), de.step(), sp.zero_grad(), de.zero_grad()
        results.append(([p.detach().clone() for p in m.parameters()], [t.state_dict()["values"] for t in m.tables()]))
    for x, y in zip(results[0][0] + results[0][1], results[1][0] + results[1][1], strict=True):
        assert torch.equal(x, y)


def test_fp16_overflow_skips_the_step_and_backs_off(tmp_path):
    m, sp, de = small_parts()
    data = [{"ids": torch.tensor([[1, 2]]), "label": torch.tensor([1.0])}] * 3
    args = TrainingArguments(str(tmp_path), max_steps=1, mixed_precision="fp16", resume=False)
    t = Trainer(m, args, data, dense_optimizer=de, sparse_optimizer=sp)
    t.scaler = DynamicLossScaler(init_scale=2.0**140)  # the scaled loss overflows float32
    head = m.head.weight.detach().clone()
    t.train()
    assert t.scaler.scale == 2.0**139 and t.scaler.skipped == 1
    assert torch.equal(m.head.weight, head)
    assert torch.equal(m.emb.table.embeddings(torch.tensor([1, 2])), m.emb.table.initial_values(torch.tensor([1, 2])))


def test_fp16_trains_and_resumes_its_scale(orc_dir, tmp_path):
    m, ds, sp, de = deepfm_parts(orc_dir)
    args = TrainingArguments(str(tmp_path), max_steps=8, mixed_precision="fp16", log_every_steps=2, resume=False)
    t = Trainer(m, args, ds, dense_optimizer=de, sparse_optimizer=sp, input_fn=to_input)
    t.scaler.growth_interval = 3  # let the scale grow inside the run
    t.train()
    assert t.scaler.scale == 2.0**18 and t.scaler.skipped == 0
    m2, ds2, sp2, de2 = deepfm_parts(orc_dir)
    args2 = TrainingArguments(str(tmp_path), max_steps=9, mixed_precision="fp16")
    t2 = Trainer(m2, args2, ds2, dense_optimizer=de2, sparse_optimizer=sp2, input_fn=to_input)
    t2.train()
    assert t2.scaler.state_dict()["scale"] == 2.0**18


def test_tensorboard_events_and_png_curves_match_the_log(orc_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m, ds, sp, de = deepfm_parts(orc_dir)
    ev = OrcDataset(str(orc_dir), 500, ["label", *DENSE, *SPARSE])
    args = TrainingArguments(
        str(tmp_path), max_steps=6, log_every_steps=2, eval_every_steps=3, tensorboard=True, plot=True, resume=False
    )
    t = Trainer(m, args, ds, ev, dense_optimizer=de, sparse_optimizer=sp, input_fn=to_input)
    t.train()
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "curves.png").shape[:2] == (400, 1000)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    from recis.framework.curves import read_log

    loss, auc = read_log(tmp_path / "log.jsonl")
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")] == [
        (s, round(v, 5)) for s, v in sorted(loss.items())
    ]
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("eval/auc")] == [
        (s, round(v, 5)) for s, v in sorted(auc.items())
    ]
    assert sorted(auc) == [3, 6]


def test_warm_start_loads_the_chosen_parts_and_starts_at_step_0(tmp_path, capsys):
    data = [{"ids": torch.tensor([[1, 2], [3, 4]]), "label": torch.tensor([1.0, 0.0])}] * 3
    quiet = dict(tensorboard=False, plot=False, progress=False)
    m, sp, de = small_parts()
    args = TrainingArguments(str(tmp_path / "a"), max_steps=3, resume=False, **quiet)
    Trainer(m, args, data, dense_optimizer=de, sparse_optimizer=sp).train()
    ids = torch.tensor([1, 2, 3, 4])
    for parts in (("sparse", "dense"), ("dense",)):
        m2, sp2, de2 = small_parts()
        out = tmp_path / f"b-{len(parts)}"
        args = TrainingArguments(
            str(out), warm_start=str(tmp_path / "a" / "checkpoints"), warm_start_parts=parts, **quiet
        )
        t = Trainer(m2, args, [], dense_optimizer=de2, sparse_optimizer=sp2)
        t.train()  # no data: loads, then saves step 0
        assert "warm start from" in capsys.readouterr().out
        assert t.global_step == 0 and t.checkpoints.latest().endswith("ckpt-0")
        assert torch.equal(m2.head.weight, m.head.weight)
        if "sparse" in parts:
            assert torch.equal(m2.emb.table.embeddings(ids), m.emb.table.embeddings(ids))
        else:
            assert len(m2.emb.table) == 0
    with pytest.raises(ValueError, match="warm_start_parts"):
        TrainingArguments(str(tmp_path / "c"), warm_start="x", warm_start_parts=("tables",))
    m3, sp3, de3 = small_parts()
    args = TrainingArguments(str(tmp_path / "d"), warm_start=str(tmp_path / "nowhere"), **quiet)
    with pytest.raises(ValueError, match="nowhere: no such checkpoint"):
        Trainer(m3, args, [], dense_optimizer=de3, sparse_optimizer=sp3).train()


def test_sparse_update_is_in_backward_only_where_nothing_needs_the_gradient(tmp_path):
    data = [{"ids": torch.tensor([[1, 2]]), "label": torch.tensor([1.0])}]

    def chosen(sparse_update="auto", opt=None, **kw):
        m = Small()
        sp = opt if opt is not None else SparseAdam(m, lr=0.05)
        args = TrainingArguments(str(tmp_path / "x"), sparse_update=sparse_update, **kw)
        Trainer(m if opt is None else opt_model[0], args, data, sparse_optimizer=sp)
        return sp.in_backward

    opt_model = [None]
    assert chosen() is True
    assert chosen(gradient_accumulation_steps=2) is False
    assert chosen(mixed_precision="fp16") is False
    assert chosen("deferred") is False
    with pytest.raises(ValueError, match="gradient_accumulation_steps = 2"):
        chosen("in_backward", gradient_accumulation_steps=2)
    # The optimizer's own choice holds under "auto"; a Trainer's choice does
    # not stick to an optimizer reused by another Trainer.
    m = Small()
    opt_model[0] = m
    assert chosen(opt=SparseAdam(m, in_backward=False)) is False
    with pytest.raises(ValueError, match="fp16 loss scaling"):
        chosen(opt=SparseAdam(m, in_backward=True), mixed_precision="fp16")
    reused = SparseAdam(m)
    assert chosen(opt=reused) is True
    assert chosen(opt=reused, gradient_accumulation_steps=2) is False
    with pytest.raises(ValueError, match="sparse_update"):
        TrainingArguments(str(tmp_path), sparse_update="later")


# ---------------------------------------------------------------------------
# Validation: periodic, early stopping, the best checkpoint


class Batches:
    """A list of batches with a resumable cursor, as ``OrcDataset``'s: the
    state is the position after the last batch handed out."""

    def __init__(self, items):
        self.items, self.epoch, self.pos = items, 0, 0

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        while self.pos < len(self.items):
            self.pos += 1
            yield self.items[self.pos - 1]
        self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def id_batches(n, seed, flip=False):
    """Batches of 32 rows of 2 ids in [0, 40), clicked when the first id is
    odd; ``flip``: the opposite labels, so that the better the model learns
    the training batches, the worse it does on these (a validation set
    whose log loss stops improving after the first validation)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (32, 2), generator=g)
        y = (ids[:, 0] % 2).float()
        out.append({"ids": ids, "label": 1 - y if flip else y})
    return out


QUIET = dict(tensorboard=False, plot=False, progress=False)


def records(out_dir, key):
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def validated(out_dir, **kw):
    """A Small model trained on 4 batches an epoch, validated on the flipped
    batches, tested on fresh ones; returns the trainer, after train()."""
    m, sp, de = small_parts()
    args = TrainingArguments(str(out_dir), **{**QUIET, **kw})
    t = Trainer(
        m,
        args,
        Batches(id_batches(4, 0)),
        id_batches(2, 2),
        dense_optimizer=de,
        sparse_optimizer=sp,
        valid_dataset=id_batches(2, 1, flip=True),
    )
    t.train()
    return t


def test_validation_runs_at_the_configured_steps_or_each_epoch_and_eval_at_the_end(tmp_path):
    validated(tmp_path / "steps", epochs=2, eval_every=3)
    assert [r["valid"]["step"] for r in records(tmp_path / "steps", "valid")] == [3, 6, 8]  # and at the end
    assert [r["eval"]["step"] for r in records(tmp_path / "steps", "eval")] == [8]  # the test set: at the end only
    validated(tmp_path / "alias", epochs=2, eval_every_steps=3)  # the older name
    assert [r["valid"]["step"] for r in records(tmp_path / "alias", "valid")] == [3, 6, 8]
    validated(tmp_path / "epoch", epochs=3, eval_every="epoch")
    assert [r["valid"]["step"] for r in records(tmp_path / "epoch", "valid")] == [4, 8, 12]
    validated(tmp_path / "end", epochs=1)  # no eval_every: at the end only
    assert [r["valid"]["step"] for r in records(tmp_path / "end", "valid")] == [4]
    # Without a validation set, as before: periodic evaluation on the eval data.
    m, sp, de = small_parts()
    args = TrainingArguments(str(tmp_path / "none"), epochs=2, eval_every=3, **QUIET)
    Trainer(m, args, id_batches(4, 0), id_batches(2, 2), dense_optimizer=de, sparse_optimizer=sp).train()
    assert [r["eval"]["step"] for r in records(tmp_path / "none", "eval")] == [3, 6, 8]
    assert not records(tmp_path / "none", "valid")
    assert not os.path.exists(tmp_path / "none" / "checkpoints" / "best")


def expected_stop(values, patience, higher_is_better):
    """(the index of the validation that stops training, the best's index)
    from the logged metric values."""
    best, bad = None, 0
    for i, v in enumerate(values):
        if best is None or (v > values[best] if higher_is_better else v < values[best]):
            best, bad = i, 0
        else:
            bad += 1
        if bad >= patience:
            return i, best
    return None, best


def test_early_stopping_stops_when_the_metric_stops_improving(tmp_path, capsys):
    t = validated(tmp_path, epochs=10, eval_every=2, metric_for_best="log_loss", early_stopping_patience=2)
    valid = records(tmp_path, "valid")
    steps, values = [r["valid"]["step"] for r in valid], [r["valid"]["log_loss"] for r in valid]
    stop, best = expected_stop(values, 2, higher_is_better=False)
    assert stop is not None and steps[stop] < 40  # before the 10 epochs' 40 steps
    assert t.global_step == steps[stop] and steps[-1] == steps[stop] and t.stopped_early
    assert t.best == {"metric": "log_loss", "value": values[best], "step": steps[best]}
    assert [r["bad_validations"] for r in valid][-1] == 2
    (record,) = records(tmp_path, "early_stopping")
    assert record["early_stopping"] == {
        "step": steps[stop],
        "metric": "log_loss",
        "patience": 2,
        "best_step": steps[best],
        "best_value": values[best],
    }
    out = capsys.readouterr().out
    assert f"early stopping at step {steps[stop]}: valid log_loss has not improved for 2 validations" in out
    # Run again: it resumes from the end, stopped, and trains no further.
    t2 = validated(tmp_path, epochs=10, eval_every=2, metric_for_best="log_loss", early_stopping_patience=2)
    assert t2.global_step == steps[stop] and t2.stopped_early
    assert "nothing more to train" in capsys.readouterr().out
    assert len(records(tmp_path, "valid")) == len(valid)  # no validation again


def test_the_best_checkpoint_survives_keep_checkpoints_1_and_loads_at_the_end(tmp_path):
    from safetensors.torch import load_file

    from recis.framework import evaluate_model

    kw = dict(eval_every=2, save_every_steps=1, keep_checkpoints=1, metric_for_best="log_loss", load_best_at_end=True)
    t = validated(tmp_path, epochs=3, **kw)
    valid = records(tmp_path, "valid")
    values = {r["valid"]["step"]: r["valid"]["log_loss"] for r in valid}
    best_step = min(values, key=values.get)
    assert best_step < t.global_step == 12
    ckpt = tmp_path / "checkpoints"
    # keep_checkpoints = 1 kept the last, and the best.
    assert {p.name for p in ckpt.iterdir() if p.name.startswith("ckpt-")} == {f"ckpt-{best_step}", "ckpt-12"}
    pointer = json.loads((ckpt / "best").read_text())
    assert pointer == {
        "checkpoint": f"ckpt-{best_step}",
        "step": best_step,
        "metric": "log_loss",
        "value": values[best_step],
    }
    assert t.checkpoints.best() == str(ckpt / f"ckpt-{best_step}")
    # load_best_at_end: the model is the best checkpoint's, dense and sparse.
    dense = load_file(ckpt / f"ckpt-{best_step}" / "dense.safetensors")
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, dense[k]), k
    fresh, _, _ = small_parts()
    t.checkpoints.load(str(ckpt / f"ckpt-{best_step}"), tables={"emb": fresh.emb.table}, parts=("sparse",))
    ids = torch.arange(40)
    assert torch.equal(t.model.emb.table.embeddings(ids), fresh.emb.table.embeddings(ids))
    # The final evaluation, on the test set, is the best model's.
    (final,) = records(tmp_path, "eval")
    assert final["model_step"] == best_step and final["eval"]["step"] == 12
    fresh.load_state_dict(dense)
    again = evaluate_model(fresh, id_batches(2, 2))
    assert final["eval"]["log_loss"] == pytest.approx(again["log_loss"], rel=1e-6)
    # The last checkpoint is still the exact resume point: the last step's.
    last = load_file(ckpt / "ckpt-12" / "dense.safetensors")
    assert not all(torch.equal(last[k], dense[k]) for k in dense)


def test_resume_keeps_the_best_and_the_patience_count(tmp_path):
    kw = dict(epochs=10, eval_every=2, metric_for_best="log_loss", early_stopping_patience=3)
    whole = validated(tmp_path / "whole", **kw)
    valid = records(tmp_path / "whole", "valid")
    assert whole.stopped_early and whole.global_step == valid[-1]["valid"]["step"]
    cut = valid[-2]["valid"]["step"]  # interrupted one validation before the stop: its patience count is 2
    assert valid[-2]["bad_validations"] == 2
    part = validated(tmp_path / "cut", max_steps=cut, **kw)
    assert part.global_step == cut and not part.stopped_early
    resumed = validated(tmp_path / "cut", **kw)
    assert resumed.global_step == whole.global_step and resumed.stopped_early
    assert resumed.best == whole.best and resumed.bad_validations == whole.bad_validations == 3
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    ids = torch.arange(40)
    assert torch.equal(whole.model.emb.table.embeddings(ids), resumed.model.emb.table.embeddings(ids))
    again = records(tmp_path / "cut", "valid")
    assert [r["valid"] for r in again] == [r["valid"] for r in valid]
    assert [r["bad_validations"] for r in again] == [r["bad_validations"] for r in valid]
    assert json.loads((tmp_path / "cut" / "checkpoints" / "best").read_text()) == json.loads(
        (tmp_path / "whole" / "checkpoints" / "best").read_text()
    )


def test_a_checkpoint_from_before_validation_resumes_with_a_validation_set(tmp_path):
    m, sp, de = small_parts()
    args = TrainingArguments(str(tmp_path), max_steps=2, **QUIET)
    Trainer(m, args, Batches(id_batches(4, 0)), dense_optimizer=de, sparse_optimizer=sp).train()
    meta = json.loads((tmp_path / "checkpoints" / "ckpt-2" / "meta.json").read_text())
    assert "validation" not in meta["extra"]  # as one written before validation sets existed
    t = validated(tmp_path, max_steps=4, eval_every=2)
    assert [r["valid"]["step"] for r in records(tmp_path, "valid")] == [4]
    assert t.best["step"] == 4 and t.checkpoints.best().endswith("ckpt-4")


def test_bad_validation_arguments_are_refused_before_training(tmp_path):
    m, sp, de = small_parts()
    with pytest.raises(ValueError, match=r"metric_for_best must be one of \['auc', 'gauc', 'log_loss'\], got 'acc'"):
        TrainingArguments(str(tmp_path), metric_for_best="acc")
    with pytest.raises(ValueError, match="metric_for_best='gauc' needs group_key"):
        TrainingArguments(str(tmp_path), metric_for_best="gauc")
    TrainingArguments(str(tmp_path), metric_for_best="gauc", group_key="user")
    with pytest.raises(ValueError, match="eval_every must be an int >= 1, 'epoch' or None, got 'epochs'"):
        TrainingArguments(str(tmp_path), eval_every="epochs")
    with pytest.raises(ValueError, match="eval_every=5 and eval_every_steps=3 disagree"):
        TrainingArguments(str(tmp_path), eval_every=5, eval_every_steps=3)
    assert TrainingArguments(str(tmp_path), eval_every_steps=3).eval_every == 3
    assert TrainingArguments(str(tmp_path), eval_every="epoch").eval_every_steps is None
    with pytest.raises(ValueError, match="early_stopping_patience needs a periodic validation: set eval_every"):
        TrainingArguments(str(tmp_path), early_stopping_patience=2)
    for kw in ({"early_stopping_patience": 2, "eval_every": 2}, {"load_best_at_end": True}):
        args = TrainingArguments(str(tmp_path / "x"), **kw)
        with pytest.raises(ValueError, match="need\\(s\\) a valid_dataset"):
            Trainer(m, args, id_batches(2, 0), id_batches(2, 1), dense_optimizer=de, sparse_optimizer=sp)
    assert not (tmp_path / "x").exists()
