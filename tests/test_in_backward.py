"""Optimizer in backward (``in_backward=True``) against nn.EmbeddingBag + the
torch optimizer, for every optimizer, combiner and weighting, coalesced and
not: the pooled gradient goes straight into the update (the fused path of
``EmbeddingEngine``'s Rust pooling), or the update runs when the rows'
gradient arrives (torch's ``embedding_bag`` in ``DynamicEmbedding``,
sequence features). Either way the tables are updated inside ``backward``
and match torch; ``step`` only advances the counts."""

import zlib

import pytest
import torch
from test_loop_orders import ORDERS, run_order
from test_optim_oracle import CASES, DIM, VOCAB, random_batches
from torch import nn

from recis import RaggedTensor
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, NormalInit
from recis.nn.backend import FusedUpdate
from recis.optim import SparseAdam, SparseSGD


def in_backward(make):
    def build(t):
        opt = make(t)
        opt.in_backward = True
        return opt

    return build


@pytest.mark.parametrize("combiner,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_embedding_updates_in_backward_as_torch(name, combiner, weighted):
    make_ours, make_ref = CASES[name]
    emb = DynamicEmbedding(EmbeddingOption(dim=DIM, combiner=combiner, initializer=NormalInit(0, 0.1), seed=5))
    opt = in_backward(make_ours)(emb)
    batches = random_batches(seed=zlib.crc32(f"inb-{name}-{combiner}-{weighted}".encode()), steps=30, weighted=weighted)
    raw = batches[0][0]
    ref = nn.EmbeddingBag(VOCAB, DIM, mode=combiner, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(emb.table.initial_values(raw))
    ref_opt = make_ref(ref.parameters())
    for raw, idx, lengths, w, target in batches:
        x = RaggedTensor.from_lengths(raw[idx], lengths, w)
        out, ref_out = emb(x), ref(idx, x.offsets[:-1], per_sample_weights=w)
        before = emb.table.embeddings(raw[idx])
        ((out - target) ** 2).sum().backward()
        ((ref_out - target) ** 2).sum().backward()
        ref_opt.step()
        # Already updated by backward, before our step.
        if idx.numel():
            torch.testing.assert_close(emb.table.embeddings(raw[idx]), ref.weight.detach()[idx], rtol=1e-5, atol=1e-5)
            assert not torch.equal(before, emb.table.embeddings(raw[idx]))
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    seen = torch.unique(torch.cat([b[1] for b in batches]))
    torch.testing.assert_close(emb.table.embeddings(raw[seen]), ref.weight.detach()[seen], rtol=1e-5, atol=1e-5)


FEATURES = ["a", "b", "c"]


def engine_and_refs(name, combiner, coalesce, seed, weighted=False):
    make_ours, make_ref = CASES[name]
    engine = EmbeddingEngine(
        {
            f: EmbeddingOption(dim=DIM, combiner=combiner, initializer=NormalInit(0, 0.1), seed=11 + k)
            for k, f in enumerate(FEATURES)
        },
        coalesce=coalesce,
    )
    assert len(engine.tables()) == (1 if coalesce else len(FEATURES))
    batches = random_batches(seed=seed, steps=16, weighted=weighted)
    raw = batches[0][0]
    refs = nn.ModuleList([nn.EmbeddingBag(VOCAB, DIM, mode=combiner, sparse=True) for _ in FEATURES])
    with torch.no_grad():
        for f, r in zip(FEATURES, refs, strict=True):
            r.weight.copy_(engine.table(f).initial_values(raw))
    return engine, make_ours, refs, make_ref(refs.parameters()), batches


def shift(idx, k):
    """Feature k reads ids shifted by k, so the features see different rows."""
    return (idx + 37 * k) % VOCAB


def engine_loss(engine, b):
    raw, idx, lengths, w, target = b
    out = engine.stacked({f: RaggedTensor.from_lengths(raw[shift(idx, k)], lengths, w) for k, f in enumerate(FEATURES)})
    return ((out - target.unsqueeze(1)) ** 2).sum()


def refs_loss(refs, b):
    _raw, idx, lengths, w, target = b
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    return sum(((refs[k](shift(idx, k), offsets, per_sample_weights=w) - target) ** 2).sum() for k in range(3))


def assert_engine_matches(engine, refs, batches):
    raw = batches[0][0]
    seen = torch.unique(torch.cat([b[1] for b in batches]))
    for k, f in enumerate(FEATURES):
        rows = shift(seen, k)
        got = engine.table(f).embeddings(raw[rows])
        torch.testing.assert_close(got, refs[k].weight.detach()[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("coalesce", [True, False])
@pytest.mark.parametrize("combiner,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("name", list(CASES))
def test_engine_fused_update_in_backward_matches_torch(name, combiner, weighted, coalesce, monkeypatch):
    seed = zlib.crc32(f"fused-{name}-{combiner}-{weighted}-{coalesce}".encode())
    engine, make_ours, refs, ref_opt, batches = engine_and_refs(name, combiner, coalesce, seed, weighted)
    opt = in_backward(make_ours)(engine)
    fused = []
    real = FusedUpdate.apply
    monkeypatch.setattr(FusedUpdate, "apply", lambda self, *a: (fused.append(1), real(self, *a))[1])
    for b in batches:
        loss, ref_loss = engine_loss(engine, b), refs_loss(refs, b)
        loss.backward()
        ref_loss.backward()
        assert all(not t.pending_leaves() for t in engine.tables()), "nothing left for step"
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert len(fused) == len(batches), "every backward took the fused path"
    assert_engine_matches(engine, refs, batches)


@pytest.mark.parametrize("order", ["zero_grad_between", "zero_grad_first", "zero_grad_last", "zero_grad_keeps_tensors"])
@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad"])
def test_in_backward_in_torch_loop_orders(name, order):
    """Orders where each backward is followed by a step (torch's in-backward
    semantics: the update is the backward's, whatever zero_grad does)."""
    seed = zlib.crc32(f"order-{name}-{order}".encode())
    engine, make_ours, refs, ref_opt, batches = engine_and_refs(name, "sum", True, seed)
    opt = in_backward(make_ours)(engine)
    run_order(
        ORDERS[order],
        (lambda b: engine_loss(engine, b), opt),
        (lambda b: refs_loss(refs, b), ref_opt),
        batches,
    )
    assert_engine_matches(engine, refs, batches)


def test_in_backward_and_deferred_tables_in_one_group():
    """Two physical tables read from one block: one updated in backward,
    the other at step; both as torch."""
    engine, _make, refs, _ref, batches = engine_and_refs("adam", "sum", False, 7)
    tables = {t.name: t for t in engine.tables()}
    fast = SparseAdam([tables["a"]], lr=0.01, betas=(0.8, 0.99), eps=1e-6, in_backward=True)
    slow = SparseAdam([tables["b"], tables["c"]], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    ref_opt = torch.optim.SparseAdam(refs.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    for b in batches:
        engine_loss(engine, b).backward()
        refs_loss(refs, b).backward()
        assert not tables["a"].pending_leaves() and tables["b"].pending_leaves()
        for o in (fast, slow, ref_opt):
            o.step()
            o.zero_grad()
    assert_engine_matches(engine, refs, batches)


def test_sequence_features_update_in_backward():
    """combiner="tuple": no fused pooling; the update runs when the rows'
    gradient arrives, inside backward."""
    engine = EmbeddingEngine({"s": EmbeddingOption(dim=4, combiner="tuple", initializer=NormalInit(0, 0.1))})
    opt = SparseSGD(engine, lr=0.1, in_backward=True)
    ids = torch.tensor([5, 6, 7, 5], dtype=torch.int64)
    x = RaggedTensor.from_lengths(ids, torch.tensor([3, 1]))
    before = engine.table("s").initial_values(ids)  # not in the table yet
    out = engine({"s": x})["s"]  # [2, 3, 4]
    out.sum().backward()
    after = engine.table("s").embeddings(ids)
    # d(sum)/d(row) = number of positions reading it: id 5 twice.
    counts = torch.tensor([2.0, 1.0, 1.0, 2.0]).unsqueeze(1)
    torch.testing.assert_close(after, before - 0.1 * counts)
    opt.step()
    torch.testing.assert_close(engine.table("s").embeddings(ids), after)


def test_in_backward_refuses_loss_scaling_and_names_non_finite_gradients():
    engine = EmbeddingEngine({"a": EmbeddingOption(dim=4)})
    opt = SparseAdam(engine, in_backward=True)
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    x = {"a": RaggedTensor.from_lengths(ids, torch.tensor([2, 1]))}
    engine(x)["a"].sum().backward()
    with pytest.raises(RuntimeError, match="in_backward"):
        opt.unscale_(0.5)
    opt.step()
    before = engine.table("a").embeddings(ids)
    with pytest.raises(ValueError, match=r"table 'a'.*non-finite"):
        (engine(x)["a"] * float("nan")).sum().backward()
    torch.testing.assert_close(engine.table("a").embeddings(ids), before)


def test_lr_scheduler_drives_the_update_in_backward():
    engine, make_ours, refs, _ref, batches = engine_and_refs("sgd", "sum", True, 3)
    opt = in_backward(make_ours)(engine)
    ref_opt = torch.optim.SGD(refs.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for b in batches:
        engine_loss(engine, b).backward()
        refs_loss(refs, b).backward()
        assert not engine.tables()[0].pending_leaves(), "updated in backward"
        for o, s in ((opt, sched), (ref_opt, ref_sched)):
            o.step()
            o.zero_grad()
            s.step()
    assert_engine_matches(engine, refs, batches)


def test_a_table_read_by_two_blocks_gets_one_update_as_torch():
    """A shared table read by a sum and a mean feature: two groups, two
    blocks. In backward the table waits for both, then applies their summed
    gradient once, as torch's optimizer does for one weight used twice."""
    opts = {
        "s": EmbeddingOption(dim=DIM, combiner="sum", shared_name="t", initializer=NormalInit(0, 0.1)),
        "m": EmbeddingOption(dim=DIM, combiner="mean", shared_name="t", initializer=NormalInit(0, 0.1)),
    }
    engine = EmbeddingEngine(opts)
    opt = SparseAdam(engine, lr=0.01, betas=(0.8, 0.99), eps=1e-6, in_backward=True)
    batches = random_batches(seed=17, steps=12)
    raw = batches[0][0]
    ref = nn.Parameter(engine.table("s").initial_values(raw).clone())
    ref_opt = torch.optim.SparseAdam([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    for raw, idx, lengths, _w, target in batches:
        x = RaggedTensor.from_lengths(raw[idx], lengths)
        out = engine({"s": x, "m": x})
        ((out["s"] - target) ** 2).sum().add(((out["m"] - target) ** 2).sum()).backward()
        assert not engine.tables()[0].pending_leaves(), "updated in backward"
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        rs = torch.nn.functional.embedding_bag(idx, ref, offsets, mode="sum", sparse=True)
        rm = torch.nn.functional.embedding_bag(idx, ref, offsets, mode="mean", sparse=True)
        (((rs - target) ** 2).sum() + ((rm - target) ** 2).sum()).backward()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    seen = torch.unique(torch.cat([b[1] for b in batches]))
    torch.testing.assert_close(engine.table("s").embeddings(raw[seen]), ref.detach()[seen], rtol=1e-5, atol=1e-5)


def test_two_updates_without_a_step_between_are_refused():
    """Accumulating two backwards, or backward twice through one forward,
    cannot be an update in backward: refused, not silently wrong."""
    x = RaggedTensor.from_lengths(torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
    # combiner "sum": the fused path; "tuple": the path through w's gradient.
    for combiner in ("sum", "tuple"):
        engine = EmbeddingEngine({"a": EmbeddingOption(dim=4, combiner=combiner)})
        opt = SparseAdam(engine, in_backward=True)
        engine({"a": x})["a"].sum().backward()
        with pytest.raises(RuntimeError, match="already updated in backward"):
            engine({"a": x})["a"].sum().backward()
        opt.step()
        opt.zero_grad()
        out = engine({"a": x})["a"].sum()
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="already ran in backward"):
            out.backward()
        opt.step()
        assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 2


def test_a_feature_left_out_of_the_loss_defers_its_table_to_step():
    """A table whose lookups do not all get a gradient in backward waits:
    its update runs at step, from the gradients that did arrive."""
    engine = EmbeddingEngine({"a": EmbeddingOption(dim=4), "s": EmbeddingOption(dim=4, combiner="tuple")})
    assert len(engine.tables()) == 1
    opt = SparseSGD(engine, lr=0.1, in_backward=True)
    ids = torch.tensor([1, 2, 3])
    x = RaggedTensor.from_lengths(ids, torch.tensor([2, 1]))
    before = engine.table("a").initial_values(ids)
    engine({"a": x, "s": x})["a"].sum().backward()
    torch.testing.assert_close(engine.table("a").embeddings(ids), before)  # not yet
    opt.step()
    torch.testing.assert_close(engine.table("a").embeddings(ids), before - 0.1)


def test_param_groups_update_in_backward_and_a_refusal_leaves_the_other_group_updated():
    engine = EmbeddingEngine(
        {"a": EmbeddingOption(dim=4, combiner="tuple"), "b": EmbeddingOption(dim=4, combiner="tuple")},
        coalesce=False,
    )
    ta, tb = (engine.table(f).table for f in ("a", "b"))
    opt = SparseSGD([{"params": [ta], "lr": 0.1}, {"params": [tb], "lr": 1.0}], in_backward=True)
    ids = torch.tensor([4, 5])
    x = RaggedTensor.from_lengths(ids, torch.tensor([1, 1]))
    before_a, before_b = ta.initial_values(ids), tb.initial_values(ids)
    out = engine({"a": x, "b": x})
    (out["a"].sum() + out["b"].sum()).backward()
    assert not ta.pending_leaves() and not tb.pending_leaves()
    torch.testing.assert_close(ta.embeddings(ids), before_a - 0.1)
    torch.testing.assert_close(tb.embeddings(ids), before_b - 1.0)
    opt.step()
    assert [opt.state[p]["step"] for g in opt.param_groups for p in g["params"]] == [1, 1]
    # A NaN reaching only b's rows: b is refused and unchanged, a is updated.
    out = engine({"a": x, "b": x})
    with pytest.raises(ValueError, match="table 'b'"):
        (out["a"].sum() + out["b"].sum() * float("nan")).backward()
    torch.testing.assert_close(ta.embeddings(ids), before_a - 0.2)
    torch.testing.assert_close(tb.embeddings(ids), before_b - 1.0)
    opt.step()
    assert [opt.state[p]["step"] for g in opt.param_groups for p in g["params"]] == [2, 1]
