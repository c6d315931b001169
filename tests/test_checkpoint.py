"""CheckpointManager: exact resume, atomicity, refusals, no pickle."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recis import RaggedTensor
from recis.framework import CheckpointError, CheckpointManager
from recis.nn import CountAdmit, DynamicEmbedding, EmbeddingOption, HashTable, NormalInit
from recis.optim import SparseAdam


class Tiny(nn.Module):
    def __init__(self, dim=4, admission=None):
        super().__init__()
        opt = EmbeddingOption(dim=dim, initializer=NormalInit(0, 0.1), seed=3)
        if admission is not None:
            opt.admission = admission
        self.emb = DynamicEmbedding(opt, "emb")
        self.head = nn.Linear(dim, 1)

    def forward(self, ids):
        return self.head(self.emb(ids)).squeeze(1)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (64, 3), generator=g)
        out.append((ids, (ids[:, 0] % 3 == 0).float()))
    return out


def make(admission=None):
    torch.manual_seed(0)
    m = Tiny(admission=admission)
    sparse = SparseAdam(m, lr=0.05)
    dense = torch.optim.Adam(m.head.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(dense, step_size=3, gamma=0.5)
    return m, sparse, dense, sched


def train(m, sparse, dense, sched, data):
    for ids, y in data:
        F.binary_cross_entropy_with_logits(m(ids), y).backward()
        sparse.step()
        dense.step()
        sched.step()
        sparse.zero_grad()
        dense.zero_grad()


def snapshot(m):
    state = m.emb.table.state_dict()
    order = torch.argsort(state["ids"])
    return {k: v.clone() for k, v in m.state_dict().items()}, state["ids"][order], state["values"][order]


def parts(m, sparse, dense, sched):
    return dict(
        tables={"emb": m.emb.table}, model=m, dense_optimizer=dense, sparse_optimizer=sparse, lr_scheduler=sched
    )


def test_resume_continues_exactly_as_if_never_stopped(tmp_path):
    data = batches(10)
    a = make(CountAdmit(k=2))
    train(*a, data[:5])
    ckpt = CheckpointManager(str(tmp_path))
    ckpt.save(5, **parts(*a))
    train(*a, data[5:])
    b = make(CountAdmit(k=2))
    assert ckpt.load(**parts(*b)) == 5
    train(*b, data[5:])
    (da, ia, va), (db, ib, vb) = snapshot(a[0]), snapshot(b[0])
    for k in da:
        assert torch.equal(da[k], db[k]), k
    assert torch.equal(ia, ib) and torch.equal(va, vb)


def test_files_are_safetensors_and_json_only(tmp_path):
    a = make()
    train(*a, batches(2))
    path = CheckpointManager(str(tmp_path)).save(2, **parts(*a))
    assert sorted(os.listdir(path)) == [
        "dense.safetensors",
        "dense_optimizer.safetensors",
        "meta.json",
        "rng.safetensors",
        "table-emb.00000.safetensors",
    ]


def test_half_written_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    a = make()
    ckpt = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        train(*a, batches(1, seed=step))
        ckpt.save(step, **parts(*a))
    # A crash mid-write leaves a temporary directory and, at worst, a ckpt dir without meta.json.
    os.makedirs(tmp_path / ".tmp-ckpt-4-999")
    os.makedirs(tmp_path / "ckpt-5")
    assert [os.path.basename(p) for p in ckpt.checkpoints()] == ["ckpt-2", "ckpt-3"]
    assert os.path.basename(ckpt.latest()) == "ckpt-3"
    ckpt.save(6, **parts(*a))
    assert not (tmp_path / ".tmp-ckpt-4-999").exists()
    assert [os.path.basename(p) for p in ckpt.checkpoints()] == ["ckpt-3", "ckpt-6"]


def test_checkpoint_of_another_model_is_refused_before_anything_changes(tmp_path):
    a = make()
    train(*a, batches(2))
    ckpt = CheckpointManager(str(tmp_path))
    ckpt.save(2, **parts(*a))
    torch.manual_seed(1)
    other = Tiny(dim=8)
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"table 'emb' was saved with dim 4, the model's has dim 8"):
        ckpt.load(tables={"emb": other.emb.table}, model=other)
    with pytest.raises(CheckpointError, match=r"holds tables \['emb'\] but the model has \['x'\], none of them"):
        x = HashTable(EmbeddingOption(dim=4), name="x")
        ckpt.load(tables={"x": x})
    after = snapshot(other)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    with pytest.raises(CheckpointError, match="dense.safetensors: does not fit the model"):
        ckpt.load(tables={}, model=nn.Linear(3, 3), parts=("dense",))


def test_warm_start_of_selected_parts(tmp_path):
    a = make()
    train(*a, batches(3))
    ckpt = CheckpointManager(str(tmp_path))
    ckpt.save(3, **parts(*a))
    b = make()
    ckpt.load(tables={"emb": b[0].emb.table}, model=b[0], parts=("sparse", "dense"))
    va, vb = snapshot(a[0])[2], snapshot(b[0])[2]
    dim = b[0].emb.table.dim
    assert torch.equal(va[:, :dim], vb[:, :dim])  # embeddings carried over
    assert torch.count_nonzero(vb[:, dim:]) == 0 and torch.count_nonzero(va[:, dim:]) > 0  # Adam slots afresh
    assert b[2].state_dict()["state"] == {}  # dense optimizer not restored


def test_numpy_rng_state_is_restored_after_ragged_input_training(tmp_path):
    a = make()
    rt = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
    a[0](rt).sum().backward()
    a[1].step()
    np.random.seed(7)
    path = CheckpointManager(str(tmp_path)).save(1, **parts(*a))
    expect = np.random.rand()
    np.random.seed(0)
    CheckpointManager(str(tmp_path)).load(path, **parts(*make()))
    assert np.random.rand() == expect


def test_tables_are_saved_and_loaded_in_chunks(tmp_path):
    from recis.nn import HashTable

    opt = EmbeddingOption(dim=4, seed=3)
    table = HashTable(opt, "big")
    SparseAdam(table, lr=0.1)  # optimizer slots travel with the rows
    ids = torch.arange(-2500, 2500, 7) * 1_000_003
    table.native.lookup_or_insert(ids.numpy(), 0)
    manager = CheckpointManager(str(tmp_path / "ck"))
    manager.table_chunk_rows = 100
    path = manager.save(1, tables={"big": table})
    chunks = sorted(p for p in os.listdir(path) if p.startswith("table-big."))
    assert len(chunks) == -(-len(ids) // 100)
    fresh = HashTable(opt, "big")
    SparseAdam(fresh, lr=0.1)
    manager.load(path, tables={"big": fresh}, parts=("sparse", "optimizer"))
    a, b = table.state_dict(), fresh.state_dict()
    oa, ob = torch.argsort(a["ids"]), torch.argsort(b["ids"])
    assert torch.equal(a["ids"][oa], b["ids"][ob]) and torch.equal(a["values"][oa], b["values"][ob])
    # A damaged chunk is found before the table changes.
    with open(os.path.join(path, chunks[-1]), "r+b") as f:
        f.truncate(40)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=chunks[-1].replace(".", r"\.")):
        manager.load(path, tables={"big": fresh}, parts=("sparse", "optimizer"))
    assert torch.equal(fresh.state_dict()["values"], before["values"])


def test_checkpoints_of_one_file_a_table_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    a = make()
    train(*a, batches(2))
    path = CheckpointManager(str(tmp_path)).save(2, **parts(*a))
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    for key in ("checksums", "meta_checksum", "suspect"):  # the earlier layout had none
        meta.pop(key)
    meta["dense_optimizer"].pop("class")
    for name, t in meta["tables"].items():  # rewrite as the earlier layout
        for chunk in t.pop("files"):
            os.remove(os.path.join(path, chunk))
        save_file(a[0].emb.table.state_dict(), os.path.join(path, f"table-{name}.safetensors"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    b = make()
    assert CheckpointManager(str(tmp_path)).load(path, **parts(*b)) == 2
    assert torch.equal(snapshot(a[0])[2], snapshot(b[0])[2])


def test_the_best_pointer_keeps_its_checkpoint_whatever_keep_last_says(tmp_path):
    import json

    from recis.framework.checkpoint import read_best, resolve_checkpoint

    a = make()
    ckpt = CheckpointManager(str(tmp_path), keep_last=1)
    ckpt.save(1, **parts(*a))
    ckpt.save(2, **parts(*a), best={"metric": "auc", "value": 0.75})
    for step in (3, 4, 5):
        ckpt.save(step, **parts(*a))
    names = sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt-"))
    assert names == ["ckpt-2", "ckpt-5"]  # the last, and the best
    assert json.loads((tmp_path / "best").read_text()) == {
        "checkpoint": "ckpt-2",
        "step": 2,
        "metric": "auc",
        "value": 0.75,
    }
    assert ckpt.best() == str(tmp_path / "ckpt-2") == resolve_checkpoint(str(tmp_path / "best"))
    # A newer best takes over; the old one is pruned like any other.
    ckpt.mark_best(str(tmp_path / "ckpt-5"), "auc", 0.8)
    ckpt.save(6, **parts(*a))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt-")) == ["ckpt-5", "ckpt-6"]
    assert read_best(str(tmp_path))["value"] == 0.8
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.mark_best(str(tmp_path / "ckpt-9"), "auc", 0.9)
    # A pointer that names nothing (damaged, or its checkpoint gone) protects nothing.
    for text in ("not json", '{"checkpoint": "../ckpt-5"}', '{"checkpoint": "ckpt-2"}'):
        (tmp_path / "best").write_text(text)
        assert ckpt.best() is None
    with pytest.raises(CheckpointError, match="names no complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "best"))
    ckpt.clear_best()
    assert not (tmp_path / "best").exists()
    ckpt.save(7, **parts(*a))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt-")) == ["ckpt-7"]
