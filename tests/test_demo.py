"""The main job end to end on a small dataset, and DeepFM's shape."""

import re

import torch

from recis.cli import main
from recis.datagen import SPARSE_FIELDS
from recis.framework import CheckpointManager
from recis.models import DeepFM
from recis.ragged import RaggedTensor


def test_deepfm_forward_backward_shapes():
    m = DeepFM(["a", "b"], num_dense=3, dim=4, hidden=(8,))
    batch = {
        "a": RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])),
        "b": torch.tensor([[7], [8]]),
        "dense": torch.randn(2, 3),
    }
    out = m(batch)
    assert out.shape == (2,)
    out.sum().backward()
    assert m.mlp[0].weight.grad is not None
    a, b = m.embedding.table("a"), m.embedding.table("b")
    assert (len(a), len(b), a.dim, b.dim) == (3, 2, 5, 5)  # a table per field; embedding + first-order weight


def test_demo_trains_evaluates_and_checkpoints(tmp_path, capsys):
    workdir = tmp_path / "demo"
    args = ["demo", "--workdir", str(workdir), "--rows", "40000", "--vocab", "20000", "--batch-size", "1024"]
    args += ["--log-every", "5"]
    assert main(args) == 0
    assert main(args) == 0  # a second run trains afresh over the first one's outputs
    out = capsys.readouterr().out.split("recis 0.1.0")[-1]
    losses = [float(x) for x in re.findall(r"\] +\d+/\d+  loss (\d\.\d+)  ", out)]
    assert len(losses) >= 3 and losses[-1] < losses[0], out
    auc = float(re.search(r"AUC (\d\.\d+)", out).group(1))
    assert auc > 0.6, out
    ckpt = CheckpointManager(str(workdir / "checkpoints"))
    assert ckpt.latest() is not None
    m = DeepFM(SPARSE_FIELDS, num_dense=13, dim=16, hidden=(400, 400, 400))
    ckpt.load(tables={t.name: t for t in m.tables()}, model=m, parts=("sparse", "dense"))
    assert all(len(t) > 0 for t in m.tables())
    # "Serve a model" (README): export the demo's checkpoint, score its
    # held-out file; the AUC printed is the demo's held-out AUC.
    export = workdir / "serving" / "gen-000001"
    assert main(["export", str(workdir / "checkpoints"), "-o", str(export)]) == 0
    held_out = sorted((workdir / "data").iterdir())[-1]
    pred = workdir / "scores.parquet"
    assert main(["predict", "--export", str(export), "--data", str(held_out), "-o", str(pred)]) == 0
    line = capsys.readouterr().out
    assert abs(float(re.search(r"AUC (\d\.\d+)", line).group(1)) - auc) <= 1e-4, (line, auc)
