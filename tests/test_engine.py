"""EmbeddingEngine against plain PyTorch (F.embedding_bag / F.embedding on
dense weights + torch.optim.SparseAdam), with shared tables, a sequence
feature and the same raw ids in several features."""

import pytest
import torch
import torch.nn.functional as F

from recis import RaggedTensor
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, NormalInit
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_equals_plain_pytorch_over_steps(seed):
    engine = EmbeddingEngine(options())
    assert [t.name for t in engine.tables()] == ["a", "b", "engine_test_shared"]
    table_of = {f: engine.table_of[f] for f in "abcds"}
    data = batches(20, seed=seed)
    raw = data[0][0]
    # The oracle: one dense weight per table, rows = the table's initial values.
    weights = {
        t.name: torch.nn.Parameter(t.initial_values(raw).clone())
        for t in engine.tables()  # initial values are a function of (seed, id)
    }
    # eps as in test_optim_oracle: Adam divides by sqrt(v) + eps, which turns
    # float32 summation-order differences of a near-zero gradient into
    # visible ones at eps=1e-8.
    opt = SparseAdam(engine, lr=0.05, eps=1e-6)
    ref_opt = torch.optim.SparseAdam(list(weights.values()), lr=0.05, eps=1e-6)
    seen = {t.name: set() for t in engine.tables()}
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
    for t in engine.tables():
        ids = sorted(seen[t.name])
        assert len(t) == len(ids)
        want = weights[t.name].detach()[[pos[x] for x in ids]]
        torch.testing.assert_close(t.embeddings(torch.tensor(ids)), want, rtol=1e-4, atol=1e-5)


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
