"""DynamicEmbedding + each sparse optimizer against nn.EmbeddingBag + the
matching PyTorch optimizer, ids mapped 1:1 to rows, 50 steps on random ragged
batches."""

import zlib

import numpy as np
import pytest
import torch
from torch import nn

from recis import RaggedTensor
from recis.nn import DynamicEmbedding, EmbeddingOption, NormalInit
from recis.optim import SparseAdagrad, SparseAdam, SparseAdamW, SparseRowWiseAdagrad, SparseSGD

DIM = 8
VOCAB = 300  # distinct raw ids, spread over the whole int64 range


def random_batches(seed, steps=50, batch=32, weighted=False):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**62), 2**62, (VOCAB,), generator=g) * 2 + 1  # odd, large, signed
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 5, (batch,), generator=g)
        # Skewed ids so rows repeat inside a batch and across steps.
        idx = (torch.rand(int(lengths.sum()), generator=g) ** 3 * VOCAB).long()
        w = torch.rand(idx.numel(), generator=g) + 0.5 if weighted else None
        target = torch.randn(batch, DIM, generator=g)
        out.append((raw, idx, lengths, w, target))
    return out


class RowWiseAdagradReference(torch.optim.Optimizer):
    """Row-wise Adagrad written plainly in torch, for rows with a gradient."""

    def __init__(self, params, lr, eps):
        super().__init__(params, dict(lr=lr, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.coalesce()
                rows, vals = g.indices()[0], g.values()
                acc = self.state[p].setdefault("acc", torch.zeros(p.shape[0]))
                acc[rows] += (vals * vals).mean(1)
                p[rows] -= group["lr"] * vals / (acc[rows].sqrt() + group["eps"]).unsqueeze(1)


class AdamWLazyReference(torch.optim.Optimizer):
    """SparseAdam plus decoupled decay of touched rows (the documented AdamW rule)."""

    def __init__(self, params, lr, weight_decay):
        self.inner = torch.optim.SparseAdam(params, lr=lr)
        super().__init__(self.inner.param_groups[0]["params"], dict(lr=lr, wd=weight_decay))

    @torch.no_grad()
    def step(self):
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            rows = p.grad.coalesce().indices()[0]
            p[rows] *= 1 - self.defaults["lr"] * self.defaults["wd"]
        self.inner.step()


CASES = {
    # lr small enough that plain SGD on a squared loss converges (at 0.1 it diverges).
    "sgd": (lambda t: SparseSGD(t, lr=0.02), lambda p: torch.optim.SGD(p, lr=0.02)),
    "adagrad": (
        lambda t: SparseAdagrad(t, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    ),
    "adam": (
        lambda t: SparseAdam(t, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
        lambda p: torch.optim.SparseAdam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    ),
    "rowwise_adagrad": (
        lambda t: SparseRowWiseAdagrad(t, lr=0.1, eps=1e-8),
        lambda p: RowWiseAdagradReference(p, lr=0.1, eps=1e-8),
    ),
    "adamw": (
        lambda t: SparseAdamW(t, lr=0.01, weight_decay=0.1),
        lambda p: AdamWLazyReference(p, lr=0.01, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("combiner,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_embedding_bag_with_torch_optimizer(name, combiner, weighted):
    make_ours, make_ref = CASES[name]
    option = EmbeddingOption(dim=DIM, combiner=combiner, initializer=NormalInit(0, 0.1), seed=5)
    emb = DynamicEmbedding(option)
    opt = make_ours(emb)
    batches = random_batches(seed=zlib.crc32(f"{name}-{combiner}-{weighted}".encode()), weighted=weighted)
    raw = batches[0][0]
    ref = nn.EmbeddingBag(VOCAB, DIM, mode=combiner, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(emb.table.initial_values(raw))  # id k <-> row k
    ref_opt = make_ref(ref.parameters())

    for raw, idx, lengths, w, target in batches:
        x = RaggedTensor.from_lengths(raw[idx], lengths, w)
        out = emb(x)
        ref_out = ref(idx, x.offsets[:-1], per_sample_weights=w)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        loss = ((out - target) ** 2).sum()
        ref_loss = ((ref_out - target) ** 2).sum()
        loss.backward()
        ref_loss.backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()

    seen = torch.unique(torch.cat([b[1] for b in batches]))
    got = emb.table.embeddings(raw[seen])
    torch.testing.assert_close(got, ref.weight.detach()[seen], rtol=1e-5, atol=1e-5)
    assert len(emb.table) == seen.numel()


def test_accumulated_micro_steps_equal_one_big_batch():
    """Gradients of k micro-batches summed before one update = one batch."""
    batches = random_batches(seed=3, steps=4)
    raw = batches[0][0]

    def run(accumulate):
        emb = DynamicEmbedding(EmbeddingOption(dim=DIM, initializer=NormalInit(0, 0.1), seed=1))
        opt = SparseAdam(emb, lr=0.05)
        if accumulate:
            for _, idx, lengths, _, target in batches:
                out = emb(RaggedTensor.from_lengths(raw[idx], lengths))
                ((out - target) ** 2).sum().backward()
        else:
            idx = torch.cat([b[1] for b in batches])
            lengths = torch.cat([b[2] for b in batches])
            target = torch.cat([b[4] for b in batches])
            out = emb(RaggedTensor.from_lengths(raw[idx], lengths))
            ((out - target) ** 2).sum().backward()
        opt.step()
        return emb.table.embeddings(raw)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_lr_scheduler_drives_the_sparse_lr():
    emb = DynamicEmbedding(EmbeddingOption(dim=2, initializer=NormalInit(0, 0.1)))
    opt = SparseSGD(emb, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ids = torch.tensor([[7]])
    lrs = []
    for _ in range(3):
        before = emb.table.embeddings(torch.tensor([7]), missing="initial").clone()
        emb(ids).sum().backward()
        opt.step()
        opt.zero_grad()
        after = emb.table.embeddings(torch.tensor([7]))
        lrs.append(float((before - after)[0, 0]))  # grad of sum is 1: delta = lr
        sched.step()
    np.testing.assert_allclose(lrs, [1.0, 0.5, 0.25], rtol=1e-6)


def test_optimizer_state_dict_round_trip_is_json():
    import json

    emb = DynamicEmbedding(EmbeddingOption(dim=2), name="e")
    opt = SparseAdam(emb, lr=0.01)
    emb(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    sd = json.loads(json.dumps(opt.state_dict()))
    assert sd["state"]["e"]["step"] == 1
    opt2 = SparseAdam(DynamicEmbedding(EmbeddingOption(dim=2), name="e"), lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="'adam' optimizer, not 'sgd'"):
        SparseSGD(DynamicEmbedding(EmbeddingOption(dim=2), name="e")).load_state_dict(sd)
