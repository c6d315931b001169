"""Gradient clipping over dense and sparse gradients together, LR warm-up
and decay for dense and sparse optimizers, and the dense/sparse optimizer
hyper-parameters of job configs; against torch's own clip_grad_norm_,
schedulers and optimizers."""

import json

import pytest
import torch
from torch import nn

from recis import RaggedTensor
from recis.config import ConfigError, load_config
from recis.nn import DynamicEmbedding, EmbeddingOption, NormalInit
from recis.optim import Schedulers, SparseAdagrad, SparseAdam, SparseSGD, clip_grad_norm_, warmup_schedule

DIM, VOCAB, BATCH = 8, 50, 16


def batches(seed, steps=20):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**62), 2**62, (VOCAB,), generator=g) * 2 + 1
    out = []
    for _ in range(steps):
        lengths = torch.randint(1, 4, (BATCH,), generator=g)
        idx = (torch.rand(int(lengths.sum()), generator=g) ** 2 * VOCAB).long()
        out.append((raw, idx, lengths, torch.randn(BATCH, 1, generator=g) * 5))
    return out


CASES = {
    "sgd": (lambda t: SparseSGD(t, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "adagrad": (lambda t: SparseAdagrad(t, lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
}


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
@pytest.mark.parametrize("name", list(CASES))
def test_clipping_dense_and_sparse_together_matches_torch(name, max_norm):
    """One norm over the table rows and the dense layer, as torch's
    clip_grad_norm_ over an EmbeddingBag (dense gradient: SGD and Adagrad
    leave rows with a zero gradient unchanged) and the same layer."""
    make_sparse, make_dense = CASES[name]
    emb = DynamicEmbedding(EmbeddingOption(dim=DIM, initializer=NormalInit(0, 0.3), seed=2))
    head = nn.Linear(DIM, 1)
    data = batches(seed=7)
    raw = data[0][0]
    ref = nn.EmbeddingBag(VOCAB, DIM, mode="sum")
    ref_head = nn.Linear(DIM, 1)
    with torch.no_grad():
        ref.weight.copy_(emb.table.initial_values(raw))
        ref_head.load_state_dict(head.state_dict())
    sparse, dense = make_sparse(emb), make_dense(head.parameters())
    ref_opt = make_dense(list(ref.parameters()) + list(ref_head.parameters()))
    clipped = 0
    for raw, idx, lengths, y in data:
        x = RaggedTensor.from_lengths(raw[idx], lengths)
        loss = ((head(emb(x)) - y) ** 2).mean()
        ref_loss = ((ref_head(ref(idx, x.offsets[:-1])) - y) ** 2).mean()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        loss.backward()
        ref_loss.backward()
        norm = clip_grad_norm_(max_norm, head.parameters(), [sparse])
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()) + list(ref_head.parameters()), max_norm)
        assert norm == pytest.approx(float(ref_norm), rel=1e-5)
        clipped += norm > max_norm
        for opt in (sparse, dense, ref_opt):
            opt.step()
            opt.zero_grad()
    if max_norm < 1e6:
        assert clipped > 0  # the case clips
    seen = torch.unique(torch.cat([b[1] for b in data]))
    torch.testing.assert_close(emb.table.embeddings(raw[seen]), ref.weight.detach()[seen], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight, ref_head.weight, rtol=1e-5, atol=1e-5)


def test_clipping_refuses_an_update_in_backward_and_bad_norms():
    emb = DynamicEmbedding(EmbeddingOption(dim=DIM))
    opt = SparseAdam(emb, in_backward=True)
    with pytest.raises(RuntimeError, match="in_backward=True"):
        clip_grad_norm_(1.0, [], [opt])
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="max_norm"):
            clip_grad_norm_(bad, [], [])


def torch_warmup_cosine(opt, warmup, total, min_ratio):
    """torch's own schedulers: LinearLR (from 1/warmup) then CosineAnnealingLR."""
    base = opt.param_groups[0]["lr"]
    s = torch.optim.lr_scheduler
    return s.SequentialLR(
        opt,
        [
            s.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
            s.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_ratio * base),
        ],
        milestones=[warmup],
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_warmup_cosine_lrs_match_torch_schedulers_for_dense_and_sparse():
    emb = DynamicEmbedding(EmbeddingOption(dim=DIM))
    sparse = SparseAdam(emb, lr=0.01)
    dense = torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=0.01)
    ref = torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=0.01)
    ours = Schedulers([warmup_schedule(o, 5, "cosine", 40, 0.1) for o in (dense, sparse)])
    theirs = torch_warmup_cosine(ref, 5, 40, 0.1)
    for _ in range(41):  # to total_steps (torch's cosine is periodic after it; ours stays at the floor)
        want = ref.param_groups[0]["lr"]
        assert dense.param_groups[0]["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert sparse.param_groups[0]["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12)
        ref.step()
        theirs.step()
        ours.step()
    for _ in range(5):
        assert dense.param_groups[0]["lr"] == pytest.approx(0.001) == sparse.param_groups[0]["lr"]
        ours.step()
    # JSON state, and a resumed schedule goes on where it was.
    state = json.loads(json.dumps(ours.state_dict()))
    sparse2 = SparseAdam(DynamicEmbedding(EmbeddingOption(dim=DIM)), lr=0.01)
    dense2 = torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=0.01)
    again = Schedulers([warmup_schedule(o, 5, "cosine", 40, 0.1) for o in (dense2, sparse2)])
    again.load_state_dict(state)
    assert again.get_last_lr() == pytest.approx(ours.get_last_lr())
    with pytest.raises(ValueError, match="holds 1 schedulers, this run has 2"):
        again.load_state_dict({"schedulers": state["schedulers"][:1]})


def test_linear_decay_and_warmup_factors():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    s = warmup_schedule(opt, 4, "linear", 14, 0.0)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    want = [0.25, 0.5, 0.75, 1.0] + [1 - k / 10 for k in range(11)] + [0.0]
    assert lrs == pytest.approx(want, abs=1e-12)
    for bad, msg in [
        (dict(decay="step"), "decay 'step'"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(decay="cosine", total_steps=None), "needs total_steps"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio"),
    ]:
        with pytest.raises(ValueError, match=msg):
            warmup_schedule(opt, **bad)


JOB = """
[data]
train = ["data/part-00000.orc"]
dense = ["I1"]
dense_transform = "log1p"
batch_size = 256

[model]
name = "deepfm"
dim = 4
hidden = [16]

[[feature]]
name = "C1"
[[feature]]
name = "C2"

[optimizer]
{optimizer}

[trainer]
output_dir = "out"
max_steps = 12
log_every_steps = 3
{trainer}
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from recis.datagen import generate

    d = tmp_path_factory.mktemp("opts")
    generate(str(d / "data"), 4000, files=1, vocab=300, seed=1)
    return d


def job(tmp_path, data_dir, optimizer="", trainer=""):
    (tmp_path / "data").symlink_to(data_dir / "data")
    (tmp_path / "job.toml").write_text(JOB.format(optimizer=optimizer, trainer=trainer))
    return str(tmp_path / "job.toml")


def test_a_job_with_warmup_cosine_clipping_and_hyper_parameters(tmp_path, data_dir):
    from recis.config import Job

    path = job(
        tmp_path,
        data_dir,
        optimizer='dense = "adam"\ndense_betas = [0.8, 0.99]\ndense_eps = 1e-6\nsparse = "adam"\n'
        'sparse_betas = [0.7, 0.9]\nsparse_eps = 1e-7\nschedule = "cosine"\nwarmup_steps = 4\nmin_lr_ratio = 0.1',
        trainer="max_grad_norm = 0.5",
    )
    j = Job(load_config(path))
    d, s = j.dense_optimizer.param_groups[0], j.sparse_optimizer.param_groups[0]
    assert d["betas"] == (0.8, 0.99) and d["eps"] == 1e-6
    assert s["betas"] == (0.7, 0.9) and s["eps"] == 1e-7
    assert d["lr"] == pytest.approx(1e-3 / 4) and s["lr"] == pytest.approx(1e-3 / 4)  # warm-up's first step
    logs = j.trainer.train()
    assert j.sparse_optimizer.in_backward is False  # clipping needs the gradient at the step
    assert 0 < logs["grad_norm"]
    # At the last step (12), cosine has come down to 0.1 + 0.9 * (1 + cos(pi)) / 2 of the LR.
    assert j.dense_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)
    assert j.sparse_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)
    records = [json.loads(x) for x in open(tmp_path / "out" / "log.jsonl")]
    assert all("grad_norm" in r for r in records if "loss" in r)
    # Resumed with more steps, the schedule's state comes back from the checkpoint.
    (tmp_path / "job.toml").write_text((tmp_path / "job.toml").read_text().replace("max_steps = 12", "max_steps = 14"))
    j2 = Job(load_config(path))
    j2.trainer.train()
    assert j2.trainer.global_step == 14


@pytest.mark.parametrize(
    "optimizer, trainer, message",
    [
        ('dense = "sgd"\ndense_betas = [0.9, 0.99]', "", r"dense = 'sgd' takes no betas"),
        ('sparse = "sgd"\nsparse_eps = 1e-8', "", r"sparse = 'sgd' takes no eps"),
        ("dense_betas = [0.9]", "", r"dense_betas: two numbers in \[0, 1\)"),
        ("dense_eps = 0", "", r"dense_eps: must be > 0"),
        ('dense = "sgd"\ndense_momentum = 1.5', "", r"dense_momentum: must be in \[0, 1\)"),
        ('schedule = "step"', "", r"schedule: 'step' is not one of"),
        ("warmup_steps = -2", "", r"warmup_steps: must be >= 0"),
        ("min_lr_ratio = 3.0", "", r"min_lr_ratio: must be in \[0, 1\]"),
        ("", "max_grad_norm = -1.0", r"max_grad_norm: must be >= 0"),
        ("", 'max_grad_norm = 1.0\nsparse_update = "in_backward"', r'"in_backward" does not go with max_grad_norm'),
    ],
)
def test_bad_training_options_are_refused_at_load(tmp_path, optimizer, trainer, message):
    (tmp_path / "job.toml").write_text(JOB.format(optimizer=optimizer, trainer=trainer))
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "job.toml"))


def test_sgd_momentum_reaches_the_dense_optimizer(tmp_path, data_dir):
    from recis.config import Job

    j = Job(load_config(job(tmp_path, data_dir, optimizer='dense = "sgd"\ndense_momentum = 0.9')))
    assert j.dense_optimizer.param_groups[0]["momentum"] == 0.9


FEATURE_JOB = """
[data]
train = ["data/part-00000.orc"]
batch_size = 256

[model]
name = "deepfm"
dim = 4

[feature_defaults]
{defaults}

[[feature]]
name = "C1"
[[feature]]
name = "C2"
{c2}
"""


def feature_job(tmp_path, defaults, c2=""):
    (tmp_path / "job.toml").write_text(FEATURE_JOB.format(defaults=defaults, c2=c2) + '[trainer]\noutput_dir = "o"\n')
    return str(tmp_path / "job.toml")


def test_feature_defaults_apply_to_every_feature_that_does_not_set_the_field(tmp_path, data_dir):
    from recis.config import Job
    from recis.nn import TruncatedNormalInit, UniformInit

    (tmp_path / "data").symlink_to(data_dir / "data")
    path = feature_job(
        tmp_path,
        'initializer = "uniform"\ninit_range = 0.2\nmax_rows = 50\neviction_score = "lfu"\nmin_l2_norm = 0.001\n'
        'combiner = "mean"',
        'initializer = "truncated_normal"\ninit_std = 0.03\ncombiner = "sum"',
    )
    cfg = load_config(path)
    c1, c2 = cfg.features
    assert (c1.initializer, c1.init_range, c1.combiner) == ("uniform", 0.2, "mean")
    assert (c2.initializer, c2.init_std, c2.combiner) == ("truncated_normal", 0.03, "sum")  # its own win
    assert c2.max_rows == 50 and c2.eviction_score == "lfu"
    opts = Job(cfg).model.embedding.options
    assert opts["C1"].initializer == UniformInit(-0.2, 0.2)
    assert opts["C2"].initializer == TruncatedNormalInit(0.0, 0.03, -0.06, 0.06)
    ev = opts["C1"].eviction
    assert (ev.max_rows, ev.score, ev.min_l2_norm) == (50, "lfu", 0.001)
    # New rows really come from the initializer: uniform within ±0.2.
    ids = torch.arange(1, 2001)
    from recis.nn import DynamicEmbedding

    w = DynamicEmbedding(opts["C1"]).table.initial_values(ids)
    assert float(w.abs().max()) <= 0.2 and float(w.std()) == pytest.approx(0.2 / 3**0.5, rel=0.1)


@pytest.mark.parametrize(
    "defaults, message",
    [
        ('name = "x"', r"\[feature_defaults\]: \['name'\] belong to each feature"),
        ('shared = "t"', r"\['shared'\] belong to each feature"),
        ("colour = 1", r"\[feature_defaults\]: unknown field\(s\) \['colour'\]"),
        ('init_std = "big"', r"\[feature_defaults\].init_std: expected float"),
        ('initializer = "glorot"', r"initializer: 'glorot' is not one of"),
        ('eviction_score = "mru"', r"eviction_score: 'mru' is not one of"),
        ("min_l2_norm = -1.0", r"min_l2_norm: must be >= 0"),
    ],
)
def test_bad_feature_defaults_are_named(tmp_path, defaults, message):
    with pytest.raises(ConfigError, match=message):
        load_config(feature_job(tmp_path, defaults))


def test_per_feature_dims_from_the_config_train(tmp_path, data_dir):
    """[[feature]] dim: C1 2 wide, C2 the model's 4 (via [feature_defaults]
    for C1's width elsewhere): the tables are 2 + 1 and 4 + 1 wide (DeepFM's
    first-order weight), C1 is projected, and the job trains."""
    from recis.config import Job

    (tmp_path / "data").symlink_to(data_dir / "data")
    path = feature_job(tmp_path, "dim = 2", "dim = 0")
    cfg = load_config(path)
    assert [f.dim for f in cfg.features] == [2, 0]
    built = Job(cfg)
    opts = built.model.embedding.options
    assert (opts["C1"].dim, opts["C2"].dim) == (3, 5)
    shapes = {k: tuple(v.shape) for k, v in built.model.state_dict().items() if k.startswith("project.")}
    assert shapes == {"project.proj.C1.weight": (5, 3)}
    cfg.trainer.max_steps = 5
    built = Job(cfg)
    before = built.model.project.proj["C1"].weight.detach().clone()
    logs = built.trainer.train()
    assert built.trainer.global_step == 5, logs
    assert not torch.equal(before, built.model.project.proj["C1"].weight)


@pytest.mark.parametrize(
    "c2, message",
    [
        ("dim = -1", r"\[\[feature\]\] #2 \(C2\).dim: must be >= 1"),
        (
            'dim = 8\nshared = "t"\n[[feature]]\nname = "C3"\ncolumn = "C1"\nshared = "t"',
            r"share the table 't' but have dim",
        ),
    ],
)
def test_bad_per_feature_dims_are_named(tmp_path, c2, message):
    with pytest.raises(ConfigError, match=message):
        load_config(feature_job(tmp_path, "", c2))
