"""Trainer: gradient accumulation, exact resume through the ORC reader, NaN stop."""

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
