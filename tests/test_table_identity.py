"""Stable table identity: a logical table is its name (a feature's, or a
shared name's) — its seed comes from the name, and checkpoints load table by
table whatever else changed: features added, removed, reordered, moved in or
out of coalescing, or their admission and eviction changed."""

import logging

import pytest
import torch

from recis import RaggedTensor
from recis.cli import main
from recis.config import Job, load_config
from recis.datagen import generate
from recis.framework import CheckpointError, CheckpointManager
from recis.models import DeepFM
from recis.nn import CountAdmit, EmbeddingEngine, EmbeddingOption, EvictionOption, NormalInit
from recis.nn.options import name_seed
from recis.optim import SparseAdagrad, SparseAdam


def option(name: str, dim: int = 4, **kw) -> EmbeddingOption:
    return EmbeddingOption(dim=dim, initializer=NormalInit(0, 0.1), seed=name_seed(7, name), **kw)


def engine(names, coalesce=True, **per_name) -> EmbeddingEngine:
    return EmbeddingEngine({n: per_name.get(n, option(n)) for n in names}, coalesce=coalesce)


def train(eng: EmbeddingEngine, steps: int = 3):
    opt = SparseAdam(eng, lr=0.05)
    for step in range(steps):
        ids = torch.arange(step, step + 20)
        rt = RaggedTensor(ids, torch.arange(21))
        out = eng(dict.fromkeys(eng.options, rt))
        sum(v.sum() * (k + 1) for k, v in enumerate(out.values())).backward()
        opt.step()
        opt.zero_grad()
    return opt


def rows(eng: EmbeddingEngine, name: str) -> torch.Tensor:
    return eng.table(name).embeddings(torch.arange(0, 25))


def save(eng, opt, directory) -> CheckpointManager:
    m = CheckpointManager(str(directory))
    m.save(3, tables={t.name: t for t in eng.tables()}, sparse_optimizer=opt)
    return m


def test_a_tables_seed_is_its_names_not_its_position():
    ids = torch.arange(100)
    a = DeepFM(["C1", "C2"], dim=4)
    b = DeepFM(["C9", "C2", "C3", "C1"], dim=4)
    for f in ("C1", "C2"):
        assert torch.equal(a.embedding.table(f).initial_values(ids), b.embedding.table(f).initial_values(ids)), f
    assert not torch.equal(a.embedding.table("C1").initial_values(ids), a.embedding.table("C2").initial_values(ids))


def test_tables_load_by_name_through_added_removed_reordered_and_recoalesced(tmp_path, caplog):
    old = engine(["a", "b", "c"])
    opt = train(old)
    m = save(old, opt, tmp_path)
    # c and a reordered and now each in its own table; b removed; d added; a's
    # eviction and c's admission changed (runtime policy).
    new = engine(
        ["c", "a", "d"],
        coalesce=False,
        a=option("a", eviction=EvictionOption(ttl_steps=5)),
        c=option("c", admission=CountAdmit(2)),
    )
    new_opt = SparseAdam(new, lr=0.05)
    tables = {t.name: t for t in new.tables()}
    with caplog.at_level(logging.WARNING, logger="recis.checkpoint"):
        assert m.load(tables=tables, sparse_optimizer=new_opt, parts=("sparse", "optimizer")) == 3
    assert m.load_report == {"added": ["d"], "dropped": ["b"]}
    assert "tables b are not in the model: their rows are dropped" in caplog.text
    assert "holds no tables d: they start fresh" in caplog.text
    for f in ("a", "c"):
        assert torch.equal(rows(new, f), rows(old, f)), f
        assert len(new.table(f)) == len(old.table(f))
    assert len(new.table("d")) == 0
    # The optimizer's state (slots with the rows, step counts by table) carried over.
    old_state = old.tables()[0].state_dict()
    for f in ("a", "c"):
        t = new.table(f).table
        assert t.native.slot_width == old.tables()[0].native.slot_width
        assert t.step == old.tables()[0].step == 3
    steps = {new_opt.tables[id(p)].name: new_opt.state[p]["step"] for p in new_opt.param_groups[0]["params"]}
    assert steps == {"c": 3, "a": 3, "d": 0}  # a table with no saved source starts at 0
    assert old_state["values"].shape[1] == 4 + old.tables()[0].native.slot_width
    # And back into one coalesced table of another membership.
    again = engine(["d", "c", "a", "e"])
    (t,) = again.tables()
    m.load(tables={t.name: t}, parts=("sparse",))
    for f in ("a", "c"):
        assert torch.equal(rows(again, f), rows(old, f)), f


def test_a_changed_dim_or_optimizer_is_refused_naming_the_table(tmp_path):
    old = engine(["a", "b"])
    m = save(old, train(old), tmp_path)
    wide = engine(["a", "b"], b=option("b", dim=8))
    with pytest.raises(CheckpointError, match=r"table 'b' was saved with dim 4, the model's has dim 8"):
        m.load(tables={t.name: t for t in wide.tables()}, parts=("sparse",))
    other = engine(["a", "b"])
    ada = SparseAdagrad(other, lr=0.1)
    tables = {t.name: t for t in other.tables()}
    with pytest.raises(CheckpointError, match=r"table 'a' was saved by a 'adam' sparse optimizer \(8 slot"):
        m.load(tables=tables, sparse_optimizer=ada, parts=("sparse", "optimizer"))
    assert all(len(t) == 0 for t in tables.values())  # refused before anything changed
    m.load(tables=tables, parts=("sparse",))  # without the optimizer: the embeddings, fresh slots
    assert torch.equal(rows(other, "a"), rows(old, "a"))


CONFIG = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc"]
eval = ["data/part-00002.orc"]
dense = ["I1", "I2"]
batch_size = 256

[model]
name = "deepfm"
dim = 4
hidden = [8]

{features}

[trainer]
output_dir = "{out}"
log_every_steps = 100
{extra}
"""


def features(*specs) -> str:
    return "\n".join(f'[[feature]]\nname = "{n}"\n{extra}' for n, extra in specs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("identity")
    generate(str(d / "data"), 6000, files=3, vocab=2000, seed=0)
    return d


def test_a_job_resumes_with_changed_policies_and_warm_starts_with_an_added_feature(data, tmp_path):
    (tmp_path / "data").symlink_to(data / "data")
    base = [("C1", ""), ("C2", ""), ("C3", 'shared = "c3"')]
    path = tmp_path / "a.toml"
    path.write_text(CONFIG.format(features=features(*base), out="out", extra="epochs = 1"))
    assert main(["train", "--config", str(path)]) == 0
    ckpt = tmp_path / "out" / "checkpoints"
    trained = Job(load_config(str(path)), for_training=False)
    trained.trainer.checkpoints.load(None, tables=trained.trainer.tables, model=trained.model)
    # Resume with TTL eviction and count admission added: runtime policy, it loads.
    policy = [("C1", "ttl_steps = 5"), ("C2", "admit_after = 2"), ("C3", 'shared = "c3"')]
    path.write_text(CONFIG.format(features=features(*policy), out="out", extra="epochs = 2"))
    assert main(["train", "--config", str(path)]) == 0
    assert len(list(ckpt.glob("ckpt-*"))) >= 2
    # A feature added at the front: a new job warm-starts its tables from
    # the old one (the dense layers' inputs changed), the new table fresh.
    added = [("C9", ""), *base]
    first = sorted(ckpt.glob("ckpt-*"), key=lambda p: int(p.name[5:]))[0]
    warm = f'epochs = 1\nwarm_start = "{first}"\nwarm_start_parts = ["sparse"]'
    path_b = tmp_path / "b.toml"
    path_b.write_text(CONFIG.format(features=features(*added), out="out-b", extra=warm))
    job = Job(load_config(str(path_b)))
    job.trainer.args.max_steps = 0
    job.trainer._warm_start()
    ids = torch.arange(2000)
    for f in ("C1", "C2", "C3"):
        want = trained.model.embedding.table(f).embeddings(ids)
        assert torch.equal(job.model.embedding.table(f).embeddings(ids), want), f
    assert len(job.model.embedding.table("C9")) == 0
    # Resuming the old job's directory with the added feature: DeepFM moves
    # its MLP's input columns to the new order, the new feature's at zero.
    path.write_text(CONFIG.format(features=features(*added), out="out", extra="epochs = 3"))
    assert main(["train", "--config", str(path)]) == 0


def fitted(path):
    """The job at ``path`` with its newest checkpoint loaded, dense optimizer too, in eval mode."""
    job = Job(load_config(str(path)), for_training=False)
    t = job.trainer
    parts = ("sparse", "dense", "optimizer")
    t.checkpoints.load(None, tables=t.tables, model=job.model, dense_optimizer=job.dense_optimizer, parts=parts)
    job.model.eval()
    return job


def test_reordered_and_added_features_resume_deepfm_with_its_columns_moved(data, tmp_path, caplog):
    (tmp_path / "data").symlink_to(data / "data")
    path = tmp_path / "a.toml"
    path.write_text(CONFIG.format(features=features(("C1", ""), ("C2", "")), out="out", extra="epochs = 1"))
    assert main(["train", "--config", str(path)]) == 0
    before = fitted(path)
    b = {f"C{k}": torch.randint(0, 3000, (64, 2)) for k in (1, 2, 3)}
    b["dense"] = torch.rand(64, before.model.num_dense)
    with torch.no_grad():
        want = before.model(b)
    # Reordered: the same function, exactly; the Adam moments moved alike.
    path.write_text(CONFIG.format(features=features(("C2", ""), ("C1", "")), out="out", extra="epochs = 2"))
    with caplog.at_level(logging.WARNING, logger="recis.framework.checkpoint"):
        after = fitted(path)
    assert "trained on the features ['C1', 'C2']; moved to the model's ['C2', 'C1']" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(after.model(b), want, rtol=0, atol=1e-6)
    w0, w1 = before.model.mlp[0].weight, after.model.mlp[0].weight
    d = before.model.dim
    swapped = torch.cat([w0[:, d : 2 * d], w0[:, :d], w0[:, 2 * d :]], 1)  # C2, C1, then the dense columns
    assert torch.equal(w1, swapped)
    m0 = before.dense_optimizer.state[w0]["exp_avg_sq"]
    m1 = after.dense_optimizer.state[w1]["exp_avg_sq"]
    assert torch.equal(m1, torch.cat([m0[:, d : 2 * d], m0[:, :d], m0[:, 2 * d :]], 1))
    # Added at the front: its columns start at zero, the others where they were.
    path.write_text(CONFIG.format(features=features(("C3", ""), ("C1", ""), ("C2", "")), out="out", extra="epochs = 2"))
    added = fitted(path)
    w2 = added.model.mlp[0].weight
    assert torch.equal(w2[:, :d], torch.zeros_like(w2[:, :d]))
    assert torch.equal(w2[:, d:], w0)
    assert torch.equal(added.dense_optimizer.state[w2]["exp_avg"][:, :d], torch.zeros_like(w2[:, :d]))
    # And training resumes with it.
    assert main(["train", "--config", str(path)]) == 0


def test_reordered_features_cannot_resume_a_model_that_cannot_move_them(data, tmp_path, capsys):
    (tmp_path / "data").symlink_to(data / "data")
    path = tmp_path / "a.toml"
    dcn = CONFIG.replace('name = "deepfm"', 'name = "dcnv2"')
    path.write_text(dcn.format(features=features(("C1", ""), ("C2", "")), out="out", extra="epochs = 1"))
    assert main(["train", "--config", str(path)]) == 0
    path.write_text(dcn.format(features=features(("C2", ""), ("C1", "")), out="out", extra="epochs = 2"))
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "trained on the features ['C1', 'C2'], in that order, and the model has ['C2', 'C1']" in err, err


def test_tables_are_in_the_models_state_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    from recis.nn import dense_only

    model = DeepFM({"u": option("u", dim=5), "i": option("i", dim=5)}, num_dense=2, dim=4)
    model.train()
    b = {"u": torch.arange(30).reshape(30, 1), "i": torch.arange(60).reshape(30, 2), "dense": torch.rand(30, 2)}
    model(b).sum().backward()  # a training lookup inserts the ids
    sd = model.state_dict()
    assert {"embedding.tables.u.ids", "embedding.tables.u.weight", "embedding.tables.i.weight"} <= set(sd)
    assert sd["embedding.tables.i.weight"].shape == (60, 5)
    assert torch.equal(sd["embedding.tables.u.ids"], torch.arange(30))
    with dense_only():
        assert not any(k.startswith("embedding.tables.") for k in model.state_dict())
    save_file(sd, str(tmp_path / "model.safetensors"))  # what torch tooling would do with it
    fresh = DeepFM({"u": option("u", dim=5), "i": option("i", dim=5)}, num_dense=2, dim=4)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(b), model(b))
    assert len(fresh.embedding.table("i")) == 60
    # A dict of the dense weights alone loads and leaves the tables as they are.
    with dense_only():
        dense = model.state_dict()
    fresh.load_state_dict(dense)
    assert len(fresh.embedding.table("i")) == 60
    bad = dict(sd)
    bad["embedding.tables.u.weight"] = torch.zeros(30, 3)
    with pytest.raises(RuntimeError, match=r"embedding.tables.u.weight: must be \[30, 5\], got \(30, 3\)"):
        fresh.load_state_dict(bad)
    bad = dict(sd)
    bad["embedding.tables.nope.ids"] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*embedding.tables.nope.ids"):
        fresh.load_state_dict(bad)


def test_a_feature_of_its_own_dim_added_warm_starts_deepfm(data, tmp_path, capsys):
    """Per-feature dims: C3 added 8 wide to a DeepFM 4 wide trained on C1
    and C2. A new job warm-starts tables and dense layers: C1's and C2's
    rows and the MLP's columns are the old ones, C3's projection is its own
    initial weight and its MLP columns are zero; then it trains. Resuming
    the old directory
    with it adds a parameter the dense optimizer's state lacks: refused,
    naming the file."""
    (tmp_path / "data").symlink_to(data / "data")
    path = tmp_path / "a.toml"
    path.write_text(CONFIG.format(features=features(("C1", ""), ("C2", "")), out="out", extra="epochs = 1"))
    assert main(["train", "--config", str(path)]) == 0
    before = fitted(path)
    ckpt = sorted((tmp_path / "out" / "checkpoints").glob("ckpt-*"), key=lambda p: int(p.name[5:]))[-1]
    added = [("C1", ""), ("C2", ""), ("C3", "dim = 8")]
    warm = f'epochs = 1\nwarm_start = "{ckpt}"\nwarm_start_parts = ["sparse", "dense"]'
    path_b = tmp_path / "b.toml"
    path_b.write_text(CONFIG.format(features=features(*added), out="out-b", extra=warm))
    job = Job(load_config(str(path_b)))
    init = job.model.project.proj["C3"].weight.detach().clone()
    assert tuple(init.shape) == (5, 9)
    job.trainer.args.max_steps = 0
    job.trainer._warm_start()
    assert torch.equal(job.model.project.proj["C3"].weight, init)
    d = before.model.dim
    w0, w1 = before.model.mlp[0].weight, job.model.mlp[0].weight
    assert torch.equal(w1[:, : 2 * d], w0[:, : 2 * d]) and torch.equal(w1[:, 3 * d :], w0[:, 2 * d :])
    assert torch.equal(w1[:, 2 * d : 3 * d], torch.zeros_like(w1[:, :d]))
    ids = torch.arange(2000)
    for f in ("C1", "C2"):
        assert torch.equal(
            job.model.embedding.table(f).embeddings(ids), before.model.embedding.table(f).embeddings(ids)
        )
    assert main(["train", "--config", str(path_b)]) == 0
    path.write_text(CONFIG.format(features=features(*added), out="out", extra="epochs = 2"))
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "dense_optimizer group 0 has 6 parameters, this run's Adam has 7" in err, err
