"""EmbeddingEngine against plain PyTorch (F.embedding_bag / F.embedding on
dense weights + torch.optim.SparseAdam), with shared tables, a sequence
feature and the same raw ids in several features."""

import pytest
import torch
import torch.nn.functional as F

from recis import RaggedTensor
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, NormalInit, UniformInit
from recis.optim import SparseAdam

DIM = 4
VOCAB = 50


def options():
    init = NormalInit(0.0, 0.1)
    return {
        "a": EmbeddingOption(dim=DIM, initializer=init, seed=1),
        "b": EmbeddingOption(dim=DIM, initializer=init, seed=2, combiner="mean"),
        "c": EmbeddingOption(dim=DIM, initializer=init, seed=3, shared_name="engine_test_shared"),
        "d": EmbeddingOption(dim=DIM, initializer=init, seed=3, shared_name="engine_test_shared"),
        "s": EmbeddingOption(dim=DIM, initializer=init, seed=3, shared_name="engine_test_shared", combiner="tuple"),
    }


def batches(steps, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**62), 2**62, (VOCAB,), generator=g)
    out = []
    for _ in range(steps):
        step = {}
        for f in "abcds":
            lengths = torch.randint(0, 4, (batch,), generator=g)
            # Every feature draws from the same raw ids: same id, different rows.
            idx = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=g)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            step[f] = (idx, offsets)
        targets = {f: torch.randn(batch, DIM, generator=g) for f in "abcd"}
        out.append((raw, step, targets))
    return out


def loss_of(out, targets):
    loss = sum(((out[f] - targets[f]) ** 2).sum() for f in "abcd")
    return loss + (out["s"] ** 2).sum() * 0.5


def reference_outputs(weights, table_of, step):
    out = {}
    for f, (idx, offsets) in step.items():
        w = weights[table_of[f]]
        if f == "s":
            lengths = offsets[1:] - offsets[:-1]
            width = int(lengths.max()) if lengths.numel() else 0
            seq = torch.zeros(len(lengths), width, DIM)
            rows = [F.embedding(idx[offsets[i] : offsets[i + 1]], w, sparse=True) for i in range(len(lengths))]
            out[f] = torch.stack(
                [
                    torch.cat([r, seq.new_zeros(width - r.shape[0], DIM)]) if width else seq[i]
                    for i, r in enumerate(rows)
                ]
            )
        else:
            mode = "mean" if f == "b" else "sum"
            out[f] = F.embedding_bag(idx, w, offsets, mode=mode, include_last_offset=True, sparse=True)
    return out


@pytest.mark.parametrize(("seed", "coalesce"), [(0, True), (1, True), (2, False)])
def test_engine_equals_plain_pytorch_over_steps(seed, coalesce):
    engine = EmbeddingEngine(options(), coalesce=coalesce)
    logical = engine.logical_tables()
    assert list(logical) == ["a", "b", "engine_test_shared"]
    # One config: coalesced, the three logical tables are namespaces of one.
    assert [t.name for t in engine.tables()] == (["a+2"] if coalesce else ["a", "b", "engine_test_shared"])
    table_of = {f: engine.table_of[f] for f in "abcds"}
    data = batches(20, seed=seed)
    raw = data[0][0]
    # The oracle: one dense weight per logical table, rows = its initial values.
    weights = {
        name: torch.nn.Parameter(t.initial_values(raw).clone())
        for name, t in logical.items()  # initial values are a function of (seed, id)
    }
    # eps as in test_optim_oracle: Adam divides by sqrt(v) + eps, which turns
    # float32 summation-order differences of a near-zero gradient into
    # visible ones at eps=1e-8.
    opt = SparseAdam(engine, lr=0.05, eps=1e-6)
    ref_opt = torch.optim.SparseAdam(list(weights.values()), lr=0.05, eps=1e-6)
    seen = {name: set() for name in logical}
    for raw, step, targets in data:
        for f, (idx, _) in step.items():
            seen[table_of[f]].update(int(x) for x in raw[idx])
        batch = {f: RaggedTensor(raw[idx], offsets) for f, (idx, offsets) in step.items()}
        out = engine(batch)
        ref = reference_outputs(weights, table_of, step)
        for f in "abcds":
            assert out[f].shape == ref[f].shape, f
            torch.testing.assert_close(out[f], ref[f], rtol=1e-5, atol=1e-6, msg=f)
        loss_of(out, targets).backward()
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        loss_of(ref, targets).backward()
        ref_opt.step()
    pos = {int(x): i for i, x in enumerate(raw)}
    for name, t in logical.items():
        ids = sorted(seen[name])
        assert len(t) == len(ids)
        want = weights[name].detach()[[pos[x] for x in ids]]
        torch.testing.assert_close(t.embeddings(torch.tensor(ids)), want, rtol=1e-4, atol=1e-5)
    assert sum(len(t) for t in engine.tables()) == sum(len(s) for s in seen.values())


def test_same_id_in_two_features_gets_two_rows():
    engine = EmbeddingEngine({"x": EmbeddingOption(dim=3), "y": EmbeddingOption(dim=3)})
    ids = RaggedTensor(torch.tensor([7, 7]), torch.tensor([0, 1, 2]))
    out = engine({"x": ids, "y": ids})
    (out["x"].sum() - out["y"].sum()).backward()
    SparseAdam(engine, lr=0.1).step()
    ex, ey = engine.table("x").embeddings(torch.tensor([7])), engine.table("y").embeddings(torch.tensor([7]))
    assert len(engine.table("x")) == len(engine.table("y")) == 1
    assert not torch.equal(ex, ey)  # moved in opposite directions


def test_eval_does_not_insert_and_reads_zeros():
    engine = EmbeddingEngine({"x": EmbeddingOption(dim=3)})
    engine.eval()
    out = engine({"x": RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]))})
    assert len(engine.table("x")) == 0
    assert torch.equal(out["x"], torch.zeros(1, 3))


def test_bad_inputs_are_named():
    engine = EmbeddingEngine({"x": EmbeddingOption(dim=3), "y": EmbeddingOption(dim=3)})
    with pytest.raises(KeyError, match="'y'"):
        engine({"x": RaggedTensor(torch.tensor([1]), torch.tensor([0, 1]))})
    with pytest.raises(ValueError, match="feature 'x'.*int64"):
        engine({"x": RaggedTensor(torch.tensor([1.0]), torch.tensor([0, 1]), validate=False), "y": None})
    with pytest.raises(ValueError, match="shares table 'u'.*dim"):
        EmbeddingEngine({"p": EmbeddingOption(dim=3, shared_name="u"), "q": EmbeddingOption(dim=4, shared_name="u")})
    with pytest.raises(ValueError, match="tuple"):
        DynamicEmbedding(EmbeddingOption(dim=3, combiner="tuple"))


def test_tables_of_one_config_are_coalesced_and_others_are_not():
    init = NormalInit(0.0, 0.1)
    engine = EmbeddingEngine(
        {
            "x": EmbeddingOption(dim=3, initializer=init, seed=1),
            "y": EmbeddingOption(dim=3, initializer=init, seed=2, combiner="mean"),  # pooling differs: same table
            "z": EmbeddingOption(dim=4, initializer=init),  # another dim
            "w": EmbeddingOption(dim=3, initializer=UniformInit()),  # another initializer
            "v": EmbeddingOption(dim=3, initializer=init, seed=1, shared_name="x"),  # x's table
        }
    )
    assert [(t.name, t.namespaces) for t in engine.tables()] == [("x+1", ["x", "y"]), ("z", ["z"]), ("w", ["w"])]
    assert engine.table("v").name == "x" and engine.table("v").table is engine.table("y").table
    # Every id of every feature is its own row; the namespaces' initial
    # values follow their own seeds (x's seed 1, y's seed 2).
    ids = torch.tensor([5, 6, 5, 2**63 - 1])
    batch = {f: RaggedTensor(ids, torch.tensor([0, 2, 4])) for f in "xyzwv"}
    engine(batch)
    table = engine.tables()[0]
    assert len(engine.table("x")) == len(engine.table("y")) == 3 and len(table) == 6
    alone_x = EmbeddingEngine({"x": EmbeddingOption(dim=3, initializer=init, seed=1)}).table("x")
    alone_y = EmbeddingEngine({"y": EmbeddingOption(dim=3, initializer=init, seed=2)}).table("y")
    u = torch.tensor([5, 6, 2**63 - 1])
    assert torch.equal(engine.table("x").embeddings(u), alone_x.initial_values(u))
    assert torch.equal(engine.table("y").embeddings(u), alone_y.initial_values(u))
    assert not torch.equal(engine.table("x").embeddings(u), engine.table("y").embeddings(u))


def test_coalesced_table_checkpoint_eviction_and_a_foreign_feature_set(tmp_path):
    from recis.framework import CheckpointError, CheckpointManager
    from recis.nn import EvictionOption

    def make(features):
        return EmbeddingEngine(
            {f: EmbeddingOption(dim=2, seed=i, eviction=EvictionOption(max_rows=3)) for i, f in enumerate(features)}
        )

    engine = make("ab")
    opt = SparseAdam(engine, lr=0.1)
    for step, ids in enumerate(([1, 2, 3], [3, 4, 5], [5, 6, 1])):
        rt = RaggedTensor(torch.tensor(ids), torch.tensor([0, 1, 3]))
        out = engine({"a": rt, "b": rt})
        (out["a"].sum() + 2 * out["b"].sum()).backward()
        opt.step()
        opt.zero_grad()
        assert engine.tables()[0].step == step + 1
    (table,) = engine.tables()
    assert len(table) == 12  # ids 1..6 in each namespace
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(3, tables={table.name: table}, sparse_optimizer=opt)
    again = make("ab")
    again_opt = SparseAdam(again, lr=0.1)
    (t2,) = again.tables()
    assert manager.load(tables={t2.name: t2}, sparse_optimizer=again_opt, parts=("sparse", "optimizer")) == 3
    u = torch.arange(1, 7)
    for f in "ab":
        assert torch.equal(again.table(f).embeddings(u), engine.table(f).embeddings(u)), f
    assert t2.state_dict()["values"].shape == table.state_dict()["values"].shape
    # Another feature set: tables match by name — a loads, c starts fresh,
    # b's rows are dropped, and the load says which.
    other = make(["a", "c"])
    (t3,) = other.tables()
    manager.load(tables={t3.name: t3}, parts=("sparse",))
    assert manager.load_report == {"added": ["c"], "dropped": ["b"]}
    assert torch.equal(other.table("a").embeddings(u), engine.table("a").embeddings(u))
    assert len(other.table("c")) == 0 and len(t3) == 6
    # None of the model's tables in the checkpoint: refused, named.
    stranger = make(["x", "y"])
    (t4,) = stranger.tables()
    with pytest.raises(CheckpointError, match=r"holds tables \['a', 'b'\] but the model has \['x', 'y'\], none"):
        manager.load(tables={t4.name: t4}, parts=("sparse",))
    assert len(t4) == 0
    # max_rows=3 a feature: the coalesced table keeps 6, ranked together
    # (ids last seen at step 0 go first, in either namespace).
    gone = table.evict(by_namespace=True)
    assert len(table) == 6
    assert {f: sorted(v.tolist()) for f, v in gone.items()} == {"a": [2, 3, 4], "b": [2, 3, 4]}


def test_admission_counts_each_namespace_apart():
    from recis.nn import CountAdmit

    # x and y coalesce into one table with one sketch; an id's sightings in
    # x do not count towards its admission in y.
    engine = EmbeddingEngine({f: EmbeddingOption(dim=2, seed=i, admission=CountAdmit(k=2)) for i, f in enumerate("xy")})
    assert len(engine.tables()) == 1
    one = RaggedTensor(torch.tensor([7]), torch.tensor([0, 1]))
    engine({"x": one, "y": one})
    assert len(engine.tables()[0]) == 0
    engine({"x": one, "y": RaggedTensor(torch.tensor([8]), torch.tensor([0, 1]))})
    assert len(engine.table("x")) == 1 and len(engine.table("y")) == 0  # x saw 7 twice, y once
    engine({"x": one, "y": one})
    assert len(engine.table("y")) == 1


def test_a_coalesced_table_never_takes_another_tables_name():
    two = NormalInit(0.0, 0.2)
    engine = EmbeddingEngine(
        {"a": EmbeddingOption(dim=2), "b": EmbeddingOption(dim=2), "a+1": EmbeddingOption(dim=2, initializer=two)}
    )
    names = [t.name for t in engine.tables()]
    assert len(set(names)) == 2 and "a+1" in names
    assert engine.table("a+1").table.namespaces == ["a+1"] and engine.table("b").table.namespaces == ["a", "b"]
