"""Every loop order torch allows trains the tables exactly as torch would:
RecIS (DynamicEmbedding, and a coalesced EmbeddingEngine) against
nn.EmbeddingBag + the matching torch optimizer, both driven by the same
loop. Also torch-style param groups with an LR scheduler, and a growing
coalesced table at several rayon thread counts (it used to deadlock)."""

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from test_optim_oracle import CASES, DIM, VOCAB, random_batches
from torch import nn

from recis import RaggedTensor
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, NormalInit
from recis.optim import SparseAdam, SparseSGD

# Each order is the list of calls of one training step.
ORDERS = {
    "zero_grad_between": ["forward", "zero_grad", "backward", "step"],  # the usual torch loop
    "zero_grad_first": ["zero_grad", "forward", "backward", "step"],
    "zero_grad_last": ["forward", "backward", "step", "zero_grad"],
    "zero_grad_keeps_tensors": ["forward", "zero_grad_keep", "backward", "step"],
    # Gradients cleared before the step: torch then skips the update.
    "zero_grad_after_backward": ["forward", "backward", "zero_grad", "step"],
    # Two micro-batches accumulated, then one step.
    "accumulate_two": ["zero_grad", "forward", "backward", "forward2", "backward", "step"],
}


def run_order(order, ours, ref, batches):
    """Drives both models through ``order``; ``ours``/``ref`` are
    (forward(batch) -> loss, optimizer)."""
    (fwd, opt), (ref_fwd, ref_opt) = ours, ref
    it = iter(batches)
    per_step = sum(c.startswith("forward") for c in order)
    for _ in range(len(batches) // per_step):
        losses = []
        for call in order:
            if call in ("forward", "forward2"):
                b = next(it)
                losses.append((fwd(b), ref_fwd(b)))
            elif call == "backward":
                loss, ref_loss = losses.pop(0)
                loss.backward()
                ref_loss.backward()
            elif call == "step":
                opt.step()
                ref_opt.step()
            elif call == "zero_grad":
                opt.zero_grad()
                ref_opt.zero_grad()
            elif call == "zero_grad_keep":
                opt.zero_grad(set_to_none=False)
                ref_opt.zero_grad(set_to_none=False)


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_embedding_in_every_loop_order_matches_torch(name, order):
    make_ours, make_ref = CASES[name]
    emb = DynamicEmbedding(EmbeddingOption(dim=DIM, initializer=NormalInit(0, 0.1), seed=3))
    opt = make_ours(emb)
    batches = random_batches(seed=zlib.crc32(f"{name}-{order}".encode()), steps=24)
    raw = batches[0][0]
    ref = nn.EmbeddingBag(VOCAB, DIM, mode="sum", sparse=True)
    with torch.no_grad():
        ref.weight.copy_(emb.table.initial_values(raw))
    ref_opt = make_ref(ref.parameters())

    def ours(b):
        raw, idx, lengths, _w, target = b
        return ((emb(RaggedTensor.from_lengths(raw[idx], lengths)) - target) ** 2).sum()

    def theirs(b):
        raw, idx, lengths, _w, target = b
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        return ((ref(idx, offsets) - target) ** 2).sum()

    run_order(ORDERS[order], (ours, opt), (theirs, ref_opt), batches)
    seen = torch.unique(torch.cat([b[1] for b in batches]))
    got = emb.table.embeddings(raw[seen])
    want = ref.weight.detach()[seen]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    init = emb.table.initial_values(raw[seen])
    if order != "zero_grad_after_backward":
        assert (got - init).abs().max() > 1e-3, "the tables trained"
    else:
        torch.testing.assert_close(got, init)


FEATURES = ["a", "b", "c"]


@pytest.mark.parametrize("order", ["zero_grad_between", "accumulate_two", "zero_grad_after_backward"])
@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad", "sgd"])
def test_coalesced_engine_in_torch_loop_orders_matches_torch(name, order):
    """Three features coalesced into one physical table (three namespaces):
    the same as three nn.EmbeddingBag tables and their torch optimizer."""
    make_ours, make_ref = CASES[name]
    engine = EmbeddingEngine(
        {f: EmbeddingOption(dim=DIM, initializer=NormalInit(0, 0.1), seed=11 + k) for k, f in enumerate(FEATURES)}
    )
    assert len(engine.tables()) == 1
    opt = make_ours(engine)
    batches = random_batches(seed=zlib.crc32(f"engine-{name}-{order}".encode()), steps=16)
    raw = batches[0][0]
    refs = nn.ModuleList([nn.EmbeddingBag(VOCAB, DIM, mode="sum", sparse=True) for _ in FEATURES])
    with torch.no_grad():
        for f, r in zip(FEATURES, refs, strict=True):
            r.weight.copy_(engine.table(f).initial_values(raw))
    ref_opt = make_ref(refs.parameters())
    # Feature k reads ids shifted by k, so the features see different rows.
    shift = lambda idx, k: (idx + 37 * k) % VOCAB  # noqa: E731

    def ours(b):
        raw, idx, lengths, _w, target = b
        out = engine({f: RaggedTensor.from_lengths(raw[shift(idx, k)], lengths) for k, f in enumerate(FEATURES)})
        return sum(((out[f] - target) ** 2).sum() for f in FEATURES)

    def theirs(b):
        raw, idx, lengths, _w, target = b
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        return sum(((refs[k](shift(idx, k), offsets) - target) ** 2).sum() for k in range(len(FEATURES)))

    run_order(ORDERS[order], (ours, opt), (theirs, ref_opt), batches)
    seen = torch.unique(torch.cat([b[1] for b in batches]))
    for k, f in enumerate(FEATURES):
        rows = shift(seen, k)
        got = engine.table(f).embeddings(raw[rows])
        torch.testing.assert_close(got, refs[k].weight.detach()[rows], rtol=1e-5, atol=1e-5)


def test_param_groups_with_their_own_lr_and_a_scheduler_match_torch():
    """SparseAdam([{"params": ..., "lr": ...}, ...]) keeps torch's param-group
    semantics: each group its lr, and a scheduler drives them all."""
    user = DynamicEmbedding(EmbeddingOption(dim=DIM, initializer=NormalInit(0, 0.1), seed=1), name="user")
    item = DynamicEmbedding(EmbeddingOption(dim=DIM, initializer=NormalInit(0, 0.1), seed=2), name="item")
    opt = SparseAdam([{"params": user, "lr": 0.05}, {"params": [item], "lr": 0.01}], betas=(0.8, 0.99))
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.01]
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.99)] * 2
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    batches = random_batches(seed=9, steps=8)
    raw = batches[0][0]
    ref_u = nn.EmbeddingBag(VOCAB, DIM, mode="sum", sparse=True)
    ref_i = nn.EmbeddingBag(VOCAB, DIM, mode="sum", sparse=True)
    with torch.no_grad():
        ref_u.weight.copy_(user.table.initial_values(raw))
        ref_i.weight.copy_(item.table.initial_values(raw))
    ref_opt = torch.optim.SparseAdam(
        [{"params": ref_u.parameters(), "lr": 0.05}, {"params": ref_i.parameters(), "lr": 0.01}], betas=(0.8, 0.99)
    )
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
    for raw, idx, lengths, _w, target in batches:
        x = RaggedTensor.from_lengths(raw[idx], lengths)
        offsets = x.offsets[:-1]
        loss = ((user(x) - target) ** 2).sum() + ((item(x) * 2 - target) ** 2).sum()
        ref_loss = ((ref_u(idx, offsets) - target) ** 2).sum() + ((ref_i(idx, offsets) * 2 - target) ** 2).sum()
        opt.zero_grad()
        ref_opt.zero_grad()
        loss.backward()
        ref_loss.backward()
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    seen = torch.unique(torch.cat([b[1] for b in batches]))
    torch.testing.assert_close(user.table.embeddings(raw[seen]), ref_u.weight.detach()[seen], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item.table.embeddings(raw[seen]), ref_i.weight.detach()[seen], rtol=1e-5, atol=1e-5)
    state = opt.state_dict()
    assert [g["tables"] for g in state["param_groups"]] == [["user"], ["item"]]


def test_param_group_mistakes_are_named():
    emb = DynamicEmbedding(EmbeddingOption(dim=4))
    with pytest.raises(ValueError, match="more than one param group"):
        SparseSGD([{"params": emb}, {"params": emb.table}])
    with pytest.raises(ValueError, match="needs 'params'"):
        SparseSGD([{"params": emb}, {"lr": 0.1}])
    with pytest.raises(TypeError, match="mix of param-group dicts"):
        SparseSGD([{"params": emb}, emb])
    with pytest.raises(TypeError, match="expected hash tables"):
        SparseSGD(["not a table"])
    with pytest.raises(ValueError, match="lr"):
        SparseSGD([{"params": emb, "lr": -1.0}])


GROWING = textwrap.dedent(
    """
    import torch
    from recis import RaggedTensor, _native
    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.optim import SparseAdam

    feats = [f"f{k}" for k in range(26)]
    engine = EmbeddingEngine({f: EmbeddingOption(dim=4, initial_capacity=16, seed=k) for k, f in enumerate(feats)})
    assert len(engine.tables()) == 1
    opt = SparseAdam(engine, lr=0.01)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        ones = torch.ones(64, dtype=torch.int64)
        batch = {f: RaggedTensor.from_lengths(torch.randint(0, 2**62, (64,), generator=g), ones) for f in feats}
        out = engine.stacked(batch)
        opt.zero_grad()
        out.sum().backward()
        opt.step()
    print("threads", _native.num_threads(), "rows", len(engine.tables()[0]))
    """
)


@pytest.mark.parametrize("threads", [2, 4, 8])
def test_growing_coalesced_engine_does_not_hang(threads):
    """26 coalesced features, a tiny initial capacity and new ids every step:
    the table grows while the namespaces' lookups run in parallel. Before
    one guard per table per call it hung at 3 or more threads."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    try:
        done = subprocess.run(
            [sys.executable, "-c", GROWING], env=env, capture_output=True, text=True, timeout=240, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"200 growing steps at {threads} rayon threads did not finish in 240 s: deadlock")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"threads {threads} rows {26 * 64 * 200}" in done.stdout
