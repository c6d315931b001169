"""Incremental serving exports: deltas with tombstones, their lineage, and a
predictor that applies them while it serves."""

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from recis import _native
from recis.cli import main
from recis.config import Job, load_config
from recis.datagen import generate
from recis.serving import ExportError, Predictor, ServingExportHook, export, export_delta
from recis.serving.server import Refresher

CONFIG = """
[data]
train = ["data/part-00000.orc", "data/part-00001.orc"]
eval = ["data/part-00002.orc"]
dense = ["I1", "I2"]
dense_transform = "log1p"
batch_size = 64

[model]
name = "deepfm"
dim = 4
hidden = [16]

[[feature]]
name = "C1"
ttl_steps = 40
[[feature]]
name = "C2"
ttl_steps = 40
[[feature]]
name = "C3"

[optimizer]
sparse_lr = 0.02

[trainer]
output_dir = "out"
epochs = 3
max_steps = 300
log_every_steps = 100
evict_every_steps = 50
save_every_steps = 100
keep_checkpoints = 5
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """300 steps with TTL eviction every 50; a lineage written every 100
    steps by the hook (full at 100, deltas at 200 and 300), and a full
    export at 300 to compare with."""
    d = tmp_path_factory.mktemp("delta")
    generate(str(d / "data"), 9000, files=3, vocab=4000, seed=1)
    (d / "job.toml").write_text(CONFIG)
    job = Job(load_config(str(d / "job.toml")))
    hook = ServingExportHook(str(d / "lineage"), every_steps=100)
    job.trainer.hooks.append(hook)
    job.trainer.train()
    assert job.trainer.global_step == 300
    export(job.model, str(d / "full-300"), pipeline=job.pipeline, step=300)
    return d, hook


def served(p: Predictor) -> dict:
    return {name: (ids.copy(), rows.copy()) for name, (ids, rows) in p.tables_state().items()}


def assert_same_tables(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        assert a[name][1].tobytes() == b[name][1].tobytes(), name  # bit for bit


def eval_file(d) -> str:
    return str(d / "data" / "part-00002.orc")


def test_a_full_export_plus_its_deltas_equals_a_full_export_bit_for_bit(run):
    d, hook = run
    names = [os.path.basename(p) for p in hook.written]
    assert names == ["gen-000001", "gen-000002", "gen-000003"]
    metas = [json.load(open(os.path.join(p, "meta.json"))) for p in hook.written]
    assert [m["kind"] for m in metas] == ["full", "delta", "delta"]
    # Eviction ran between the exports: the deltas carry tombstones.
    assert sum(t["tombstones"] for m in metas[1:] for t in m["tables"].values()) > 0
    # A delta carries the rows looked up since its parent, not the whole table.
    for m in metas[1:]:
        for name, t in m["tables"].items():
            assert t["upserts"] <= t["rows"], name
    chained = Predictor(str(d / "lineage"))
    assert chained.generation == 3 and chained.step == 300
    full = Predictor(str(d / "full-300"))
    assert_same_tables(served(chained), served(full))
    a = chained.predict_files([eval_file(d)])["score"]
    b = full.predict_files([eval_file(d)])["score"]
    assert a.tobytes() == b.tobytes()


def test_apply_in_order_and_refuse_gaps_replays_and_strangers(run, tmp_path):
    d, hook = run
    g1, g2, g3 = hook.written
    p = Predictor(g1)
    before = served(p)
    with pytest.raises(ExportError, match=r"its parent is generation 2 but this predictor serves 1: a gap"):
        p.apply(g3)
    assert p.generation == 1
    assert_same_tables(served(p), before)
    assert p.apply(g2) == 2
    with pytest.raises(ExportError, match=r"generation 2 is a replay \(this predictor serves 2\)"):
        p.apply(g2)
    with pytest.raises(ExportError, match="a full export, not a delta"):
        p.apply(g1)
    # A delta of another lineage: another full export of the same model.
    other = tmp_path / "other"
    model = Predictor(g1).model
    export(model, str(other / "gen-000001"))
    model.train()
    export_delta(model, str(other / "gen-000001"), str(other / "gen-000002"))
    q = Predictor(g1)
    with pytest.raises(ExportError, match="a delta of another lineage"):
        q.apply(str(other / "gen-000002"))
    assert q.generation == 1


def test_a_damaged_delta_is_refused_and_the_last_generation_kept(run, tmp_path):
    d, hook = run
    g1, g2 = hook.written[:2]
    bad = tmp_path / "gen-000002"
    shutil.copytree(g2, bad)
    victim = sorted(f for f in os.listdir(bad) if f.startswith("upsert-"))[0]
    data = bytearray((bad / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / victim).write_bytes(bytes(data))
    p = Predictor(g1)
    before = served(p)
    scores = p.predict_files([eval_file(d)])["score"]
    with pytest.raises(ExportError, match=victim + ": checksum mismatch"):
        p.apply(str(bad))
    assert p.generation == 1
    assert_same_tables(served(p), before)
    assert p.predict_files([eval_file(d)])["score"].tobytes() == scores.tobytes()


def test_a_delta_that_fails_halfway_is_rolled_back(run, tmp_path):
    """A delta whose row count for its last table disagrees (re-checksummed,
    so it passes verification) fails after the first tables changed: every
    change is undone."""
    d, hook = run
    g1, g2 = hook.written[:2]
    bad = tmp_path / "gen-000002"
    shutil.copytree(g2, bad)
    meta = json.loads((bad / "meta.json").read_text())
    last = list(meta["tables"])[-1]
    meta["tables"][last]["rows"] += 1
    (bad / "meta.json").write_text(json.dumps(meta))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["meta.json"] = {
        "bytes": os.path.getsize(bad / "meta.json"),
        "digest": _native.checksum_file(str(bad / "meta.json")),
    }
    (bad / "manifest.json").write_text(json.dumps(manifest))
    p = Predictor(g1)
    before, dense = served(p), {k: v.clone() for k, v in p.model.state_dict().items()}
    with pytest.raises(ExportError, match=rf"table '{last}' should hold"):
        p.apply(str(bad))
    assert p.generation == 1
    assert_same_tables(served(p), before)
    for k, v in p.model.state_dict().items():
        assert torch.equal(v, dense[k]), k


def test_requests_see_one_generation_while_deltas_apply(run, tmp_path):
    d, hook = run
    root = tmp_path / "lineage"
    root.mkdir()
    shutil.copytree(hook.written[0], root / "gen-000001")
    p = Predictor(str(root))
    from recis.io import OrcDataset

    batch = next(iter(OrcDataset([eval_file(d)], 256, p.pipeline.columns(label=False))))
    inputs = p.pipeline(batch)
    expected = {1: p.predict(inputs).clone()}
    for gen in (2, 3):
        q = Predictor(hook.written[0])
        for g in range(2, gen + 1):
            q.apply(hook.written[g - 1])
        expected[gen] = q.predict(inputs).clone()
    assert not torch.equal(expected[1], expected[3])
    seen, bad, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            scores, gen = p.predict_generation(inputs)
            seen.append(gen)
            if not torch.equal(scores, expected[gen]):
                bad.append(gen)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    refresher = Refresher(p, poll_seconds=0.05, log=lambda m: None).start()
    try:
        for gen in (2, 3):
            shutil.copytree(hook.written[gen - 1], root / f"gen-{gen:06d}")
            for _ in range(400):
                if p.generation == gen:
                    break
                threading.Event().wait(0.02)
            assert p.generation == gen
    finally:
        refresher.stop()
        stop.set()
        for t in threads:
            t.join()
    assert not bad, f"scores of a mixed generation: {bad[:5]}"
    assert {1, 3} <= set(seen)
    assert not refresher.errors


def test_recis_export_delta_from_checkpoints(run, tmp_path, capsys):
    d, _ = run
    ckpts = sorted((d / "out" / "checkpoints").glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = [int(p.name.split("-")[1]) for p in ckpts]
    assert steps[-3:] == [100, 200, 300]
    c100, c200, c300 = ckpts[-3:]
    root = tmp_path / "lineage"
    assert main(["export", str(c100), "-o", str(root / "gen-000001")]) == 0
    assert main(["export", str(c200), "-o", str(root / "gen-000002"), "--delta", str(root / "gen-000001")]) == 0
    assert main(["export", str(c300), "-o", str(root / "gen-000003"), "--delta", str(root / "gen-000002")]) == 0
    out = capsys.readouterr().out
    assert "delta export, generation 3, step 300" in out
    assert_same_tables(served(Predictor(str(root))), served(Predictor(str(d / "full-300"))))
    # A delta from a checkpoint older than its parent is refused.
    code = main(["export", str(c100), "-o", str(root / "gen-000004"), "--delta", str(root / "gen-000003")])
    assert code == 1
    assert "a delta needs a model from after its parent" in capsys.readouterr().err
    assert not (root / "gen-000004").exists()


def test_the_hook_starts_each_run_with_a_full_export(run, tmp_path):
    d, hook = run
    root = tmp_path / "lineage"
    shutil.copytree(d / "lineage", root)
    job = Job(load_config(str(d / "job.toml")))
    job.trainer.checkpoints.load(
        str(d / "out" / "checkpoints" / "ckpt-200"), tables=job.trainer.tables, model=job.model
    )
    h = ServingExportHook(str(root), every_steps=100)
    h.on_step_end(job.trainer, 200)
    manifest = json.loads((root / "gen-000004" / "manifest.json").read_text())
    assert manifest["kind"] == "full" and manifest["generation"] == 4
    first = json.loads((root / "gen-000001" / "manifest.json").read_text())
    assert manifest["lineage"] != first["lineage"]
    assert Predictor(str(root)).generation == 4  # the newest full export, no delta after it


def test_a_delta_holds_only_the_rows_touched_since_its_parent(tmp_path):
    from recis.models import DeepFM
    from recis.nn import EmbeddingOption
    from recis.optim import SparseAdam
    from recis.ragged import RaggedTensor

    model = DeepFM({"u": EmbeddingOption(dim=5, seed=1), "i": EmbeddingOption(dim=5, seed=2)}, num_dense=0, dim=4)
    opt = SparseAdam(model, lr=0.05)

    def step(ids):
        n = len(ids)
        x = torch.tensor(ids, dtype=torch.int64)
        b = {"u": RaggedTensor(x, torch.arange(n + 1)), "i": RaggedTensor(x + 1000, torch.arange(n + 1))}
        loss = model(b).sigmoid().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(list(range(100)))
    export(model, str(tmp_path / "gen-000001"))
    step(list(range(10)))  # 10 old ids a table
    step([500, 501])  # and two new ones
    removed = model.embedding.tables()[0].evict(ttl_steps=2, by_namespace=True)  # seen only in the first step
    assert len(removed["u"]) == 90
    export_delta(model, str(tmp_path / "gen-000001"), str(tmp_path / "gen-000002"))
    meta = json.loads((tmp_path / "gen-000002" / "meta.json").read_text())
    for name in ("u", "i"):
        t = meta["tables"][name]
        assert (t["upserts"], t["tombstones"], t["rows"]) == (12, 90, 12), (name, t)
    chained = Predictor(str(tmp_path))
    export(model, str(tmp_path / "full"))
    assert_same_tables(served(chained), served(Predictor(str(tmp_path / "full"))))


def test_a_job_config_writes_a_lineage_that_serves(run, tmp_path):
    d, _ = run
    (tmp_path / "data").symlink_to(d / "data")
    text = CONFIG.replace("max_steps = 300", "max_steps = 100").replace(
        "keep_checkpoints = 5", 'keep_checkpoints = 5\nexport_every_steps = 50\nexport_precision = "fp16"'
    )
    (tmp_path / "job.toml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "job.toml")]) == 0
    root = tmp_path / "out" / "serving"
    assert sorted(os.listdir(root)) == ["gen-000001", "gen-000002"]
    p = Predictor(str(root))
    assert (p.generation, p.step, p.meta["precision"]) == (2, 100, "fp16")
    assert len(p.predict_files([eval_file(tmp_path)])["score"]) == 3000


def test_a_parent_written_before_an_argument_existed_is_the_same_model():
    from recis.serving.export import same_model

    spec = {"name": "deepfm", "args": {"dim": 4, "hidden": [8], "dropout": 0.0, "batch_norm": False}, "features": []}
    older = {"name": "deepfm", "args": {"dim": 4, "hidden": [8]}, "features": []}
    assert same_model(older, spec)
    assert not same_model(older, {**spec, "args": {**spec["args"], "dropout": 0.1}})
    assert not same_model(older, {**spec, "args": {**spec["args"], "hidden": [16]}})
    assert not same_model(older, {**spec, "name": "dcnv2"})
