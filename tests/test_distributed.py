"""Row-wise sharded training under torchrun (2 ranks, gloo on CPU).

The oracle is one process: two ranks with batches of B follow one process
with batches of 2B (the ranks' rows concatenated) — the same embeddings,
frequencies, dense parameters and evaluation metrics, to float rounding.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recis.distributed import owner_of
from recis.nn import dense_only

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")
FIELDS = ["f0", "f1", "f2"]
# The fields share a config, so they are the namespaces of one table; the
# workers dump each namespace as "<table>:<namespace>".
TABLE = "f0+2"
K = {f: f"{TABLE}:{f}" for f in FIELDS}


def torchrun(*args, nproc=2, timeout=180, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, WORKER, str(out), "6"], check=True, capture_output=True, env=env, timeout=180)
    env["RECIS_TEST_FP16"] = "1"
    subprocess.run([sys.executable, WORKER, str(out), "6"], check=True, capture_output=True, env=env, timeout=180)
    torchrun(WORKER, str(out), "6")
    torchrun(WORKER, str(out), "6", env={"RECIS_TEST_FP16": "1"})
    # Stopped after the checkpoint at step 3, then resumed to step 6.
    torchrun(WORKER, str(out), "3", str(out / "resumed"))
    torchrun(WORKER, str(out), "6", str(out / "resumed"))
    torchrun(WORKER, str(out), "6", env={"RECIS_TEST_ACCUM": "1"})
    subprocess.run([sys.executable, WORKER, str(out), "engine"], check=True, capture_output=True, env=env, timeout=180)
    torchrun(WORKER, str(out), "engine")
    torchrun(WORKER, str(out), "engine", env={"RECIS_TEST_IN_BACKWARD": "1"})
    # The one-process checkpoint, re-sharded over two ranks.
    torchrun(WORKER, str(out), "load", str(out / "run-1" / "checkpoints" / "ckpt-6"))
    return out


def result(out, tag):
    return load_file(str(out / f"result-{tag}.safetensors"))


def same_as_one_process(one, r0, r1, tol=1e-5):
    for f in sorted({k.split(".")[0] for k in one if not k.startswith("dense.")}):
        for rank, r in enumerate((r0, r1)):
            # Each rank holds exactly the ids it owns.
            assert (owner_of(r[f"{f}.ids"].numpy(), 2) == rank).all()
        ids = torch.cat([r0[f"{f}.ids"], r1[f"{f}.ids"]])
        order = torch.argsort(ids)
        assert torch.equal(ids[order], one[f"{f}.ids"])
        # Frequencies count every occurrence, as one process counts them.
        assert torch.equal(torch.cat([r0[f"{f}.frequency"], r1[f"{f}.frequency"]])[order], one[f"{f}.frequency"])
        values = torch.cat([r0[f"{f}.values"], r1[f"{f}.values"]])[order]
        torch.testing.assert_close(values, one[f"{f}.values"], rtol=10 * tol, atol=tol)
    for k in (k for k in one if k.startswith("dense.")):
        assert torch.equal(r0[k], r1[k]), k  # the ranks' dense parameters are identical
        torch.testing.assert_close(r0[k], one[k], rtol=10 * tol, atol=tol)


def test_two_ranks_follow_one_process(runs):
    same_as_one_process(result(runs, "1-0"), result(runs, "2-0"), result(runs, "2-1"))
    m1 = json.loads((runs / "metrics-1-0.json").read_text())
    for rank in (0, 1):
        m2 = json.loads((runs / f"metrics-2-{rank}.json").read_text())
        assert m2["step"] == m1["step"] == 6
        # Evaluation over both ranks' rows (rank 1 had fewer batches).
        for key in ("auc", "gauc", "log_loss", "calibration"):
            assert m2["eval"][key] == pytest.approx(m1["eval"][key], rel=1e-6), key


def test_engine_features_of_every_kind_over_two_ranks(runs):
    # Sum and mean pooling, a table shared by three features, a sequence
    # feature ([B, L, D]) and the same raw ids in every feature.
    one = result(runs, "1-0-engine")
    # One config: the three logical tables are namespaces of one table.
    assert {k.split(".")[0] for k in one} == {"a+2:a", "a+2:b", "a+2:engine_test_shared"}
    same_as_one_process(one, result(runs, "2-0-engine"), result(runs, "2-1-engine"))


def test_optimizer_in_backward_over_two_ranks(runs):
    # The owners apply each table's gradient in backward, once all of its
    # blocks have arrived (the shared table is read by three features in
    # two groups): the same tables as the deferred update of one process.
    same_as_one_process(result(runs, "1-0-engine"), result(runs, "2-0-engine-inb"), result(runs, "2-1-engine-inb"))


def test_gradient_accumulation_over_two_ranks(runs):
    # Two ranks, each summing two micro-batches of B/2: one process, 2B.
    same_as_one_process(result(runs, "1-0"), result(runs, "2-0-accum"), result(runs, "2-1-accum"))


def test_fp16_loss_scaling_over_two_ranks(runs):
    # Every rank skips the steps whose gradients overflow anywhere, as one
    # process does, and unscales both kinds of gradient alike.
    one = result(runs, "1-0-fp16")
    # (fp16 products round differently in batches of 16 and of 32 rows.)
    same_as_one_process(one, result(runs, "2-0-fp16"), result(runs, "2-1-fp16"), tol=1e-3)
    assert not torch.equal(one[f"{K['f0']}.values"], result(runs, "1-0")[f"{K['f0']}.values"])  # fp16 did change it


def test_resume_of_two_ranks_is_exact(runs):
    for rank in (0, 1):
        whole, resumed = result(runs, f"2-{rank}"), result(runs, f"2-{rank}-resumed")
        assert set(whole) == set(resumed)
        for k in whole:
            assert torch.equal(whole[k], resumed[k]), k
        m = json.loads((runs / f"metrics-2-{rank}-resumed.json").read_text())
        assert m["samples"] == 6  # its cursor: the batches after the third, none twice


@pytest.mark.parametrize(
    "kill",
    [
        "1,table_save,2",  # rank 1 inside the step-6 checkpoint, before its table shard is written
        "0,point_latest,2",  # rank 0 after renaming ckpt-6, before moving `latest`
        "0,sparse_step,5",  # rank 0 inside step 5
    ],
)
def test_a_rank_killed_anywhere_resumes_to_the_uninterrupted_run(runs, tmp_path, kill):
    err = failing_torchrun(tmp_path, RECIS_TEST_KILL=kill, args=("6", str(tmp_path / "job")))
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode  : -9" in err, err[-2000:]
    torchrun(WORKER, str(tmp_path), "6", str(tmp_path / "job"))
    for rank in (0, 1):
        whole, resumed = result(runs, f"2-{rank}"), result(tmp_path, f"2-{rank}-resumed")
        assert set(whole) == set(resumed)
        for k in whole:
            assert torch.equal(whole[k], resumed[k]), (kill, rank, k)
    names = sorted(os.listdir(tmp_path / "job" / "checkpoints"))
    assert names == ["ckpt-3", "ckpt-6", "latest"], names  # the half-written one was cleaned up
    assert (tmp_path / "job" / "checkpoints" / "latest").read_text() == "ckpt-6"


def test_checkpoint_layout_and_inspect(runs):
    from recis.framework import inspect_checkpoint

    ckpt = runs / "run-2" / "checkpoints" / "ckpt-6"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(meta["datasets"]) == 2
    info = inspect_checkpoint(str(ckpt))
    one = result(runs, "1-0")
    # The fields share a config: one table, each field a namespace of it.
    assert list(meta["tables"]) == [TABLE]
    shards = meta["tables"][TABLE]["shards"]
    assert shards == [[f"table-{TABLE}.r0.00000.safetensors"], [f"table-{TABLE}.r1.00000.safetensors"]]
    assert info["tables"][TABLE]["rows"] == sum(len(one[f"{K[f]}.ids"]) for f in FIELDS)
    assert info["tables"][TABLE]["namespaces"] == {f: len(one[f"{K[f]}.ids"]) for f in FIELDS}
    assert info["parts"]["world_size"] == 2


def test_two_rank_checkpoint_loads_into_one_process(runs):
    sys.path.insert(0, HERE)
    try:
        import _dist_worker as w
    finally:
        sys.path.remove(HERE)
    from recis.framework import CheckpointError, CheckpointManager

    model, dense_opt, sparse_opt = w.build()
    tables = {t.name: t for t in model.tables()}
    manager = CheckpointManager.reading(str(runs / "run-2" / "checkpoints"))
    # Cursors and RNG states are per rank: an exact resume needs two ranks.
    with pytest.raises(CheckpointError, match="saved by 2 ranks and this run has 1"):
        manager.load(tables=tables, model=model)
    assert all(len(t) == 0 for t in tables.values())  # refused before anything changed
    assert (
        manager.load(
            tables=tables,
            model=model,
            dense_optimizer=dense_opt,
            sparse_optimizer=sparse_opt,
            parts=("sparse", "dense", "optimizer"),
        )
        == 6
    )
    r0, r1 = result(runs, "2-0"), result(runs, "2-1")
    state = tables[TABLE].state_dict()
    for k, f in enumerate(FIELDS):
        mine = state["namespace"] == k
        order = torch.argsort(state["ids"][mine])
        ids = torch.cat([r0[f"{K[f]}.ids"], r1[f"{K[f]}.ids"]])
        theirs = torch.argsort(ids)
        assert torch.equal(state["ids"][mine][order], ids[theirs])
        values = torch.cat([r0[f"{K[f]}.values"], r1[f"{K[f]}.values"]])[theirs]
        assert torch.equal(state["values"][mine][order], values)
    with dense_only():
        dense = model.state_dict()
    for k, v in dense.items():
        assert torch.equal(v, r0[f"dense.{k}"])


def test_one_process_checkpoint_reshards_over_two_ranks(runs):
    one = result(runs, "1-0")
    for rank in (0, 1):
        got = result(runs, f"2-{rank}-loaded")
        for f in (K[f] for f in FIELDS):
            mine = torch.from_numpy(owner_of(one[f"{f}.ids"].numpy(), 2) == rank)
            assert torch.equal(got[f"{f}.ids"], one[f"{f}.ids"][mine])
            assert torch.equal(got[f"{f}.values"], one[f"{f}.values"][mine])
            assert torch.equal(got[f"{f}.frequency"], one[f"{f}.frequency"][mine])
        # EvictionOption(max_rows=5) over two ranks: ceil(5 / 2) rows each.
        assert json.loads((runs / f"capped-{rank}.json").read_text()) == {"rows": 3}


def failing_torchrun(out, args=("6",), **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    done = subprocess.run(cmd + [WORKER, str(out), *args], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode != 0
    return done.stdout + done.stderr


def test_a_rank_without_training_data_is_an_error_on_every_rank(tmp_path):
    err = failing_torchrun(tmp_path, RECIS_TEST_NO_DATA="1")
    assert err.count("rank(s) [1] have no training data while the other ranks have") == 2, err[-3000:]


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    err = failing_torchrun(tmp_path, RECIS_TEST_NAN="1")
    # Both ranks stop at the same step, naming the rank whose loss was NaN.
    assert err.count("non-finite loss on rank(s) [1] at step 4") == 2, err[-3000:]
    ckpt = tmp_path / "run-2" / "checkpoints"
    assert (ckpt / "latest").read_text() == "ckpt-3"
    assert sorted(p for p in os.listdir(ckpt) if p.startswith("ckpt-")) == ["ckpt-3"]


def test_owner_of_spreads_ids_and_is_stable():
    ids = np.arange(-5000, 5000, dtype=np.int64) * 7919
    for n in (2, 3, 8):
        owners = owner_of(ids, n)
        counts = np.bincount(owners, minlength=n)
        assert counts.min() > 0.8 * len(ids) / n, counts
        assert np.array_equal(owners, owner_of(ids.copy(), n))
    assert (owner_of(ids, 1) == 0).all()


def example_config(tmp_path) -> str:
    """examples/synthetic.toml, its paths moved to ``tmp_path`` and its batches made small."""
    text = open(os.path.join(os.path.dirname(HERE), "examples", "synthetic.toml")).read()
    text = text.replace("../runs/examples/synthetic/", f"{tmp_path}/").replace("batch_size = 4096", "batch_size = 256")
    (tmp_path / "job.toml").write_text(text)
    return str(tmp_path / "job.toml")


def test_recis_train_under_torchrun(tmp_path, capsys):
    from recis.cli import main
    from recis.datagen import generate

    generate(str(tmp_path / "data"), 8000, files=8, vocab=2000, seed=0)
    config = example_config(tmp_path)
    out = torchrun("-m", "recis.cli", "train", "--config", config)
    assert "2 process(es)" in out and "eval: AUC" in out
    assert out.count("eval: AUC") == 1  # rank 0 alone reports
    ckpt = tmp_path / "job" / "checkpoints"
    latest = (ckpt / "latest").read_text()
    files = os.listdir(ckpt / latest)
    assert {"rank-1.json", "rank-0.json", "meta.json"} <= set(files)
    tables = json.loads((ckpt / latest / "meta.json").read_text())["tables"]
    for name in tables:
        assert {f"table-{name}.r0.00000.safetensors", f"table-{name}.r1.00000.safetensors"} <= set(files)
    log = [json.loads(line) for line in (tmp_path / "job" / "log.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in log) and any("loss" in r for r in log)
    assert main(["inspect", str(ckpt)]) == 0
    # The sharded checkpoint evaluates in one process, and under torchrun
    # (each rank its share of the rows), to the same AUC.
    assert main(["eval", "--config", config]) == 0
    listing = capsys.readouterr().out
    assert "saved by 2 ranks" in listing and "datasets:" in listing
    one = float(re.search(r"eval: auc (\d\.\d+)", listing).group(1))
    two = torchrun("-m", "recis.cli", "eval", "--config", config)
    assert float(re.search(r"eval: auc (\d\.\d+)", two).group(1)) == one


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("T": stopped, "Z": exited, unreaped), "gone" when reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "how, verdict",
    [
        # SIGSTOP: the rank's heartbeat thread stops too.
        ("stop", "rank 1 has been silent since step 4"),
        # Asleep for ever in the sparse step, the GIL released (a deadlock in
        # native code): it beats, but rank 0 waits for it in a collective.
        ("sleep", "rank 1 has made no progress since step 4"),
    ],
)
def test_a_rank_that_hangs_ends_every_rank_naming_it(request, tmp_path, how, verdict):
    timeout = 10
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(
        os.environ, OMP_NUM_THREADS="1", RECIS_COLLECTIVE_TIMEOUT=str(timeout), RECIS_TEST_KILL=f"1,sparse_step,5,{how}"
    )
    job = tmp_path / "job"
    p = subprocess.Popen(
        cmd + [WORKER, str(tmp_path), "6", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: all((tmp_path / f"pid-{r}").exists() for r in (0, 1)), 120, "the ranks to start")
        pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
        # Rank 1 hangs inside step 5, after the checkpoint at step 3.
        hung = (
            (lambda: process_state(pids[1]) == "T")
            if how == "stop"
            else (lambda: (job / "checkpoints" / "ckpt-3").exists())
        )
        wait_for(hung, 120, f"rank 1 to hang ({how})")
        t0 = time.monotonic()
        wait_for(lambda: process_state(pids[0]) in ("Z", "gone"), timeout + 20, "rank 0 to exit")
        # Within the timeout, a heartbeat interval (1 s) and this loaded machine's slack.
        assert time.monotonic() - t0 < timeout + 15
        if how == "stop":
            os.kill(pids[1], signal.SIGCONT)  # torchrun's SIGTERM lands now, not after its 30 s grace
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    line = next((x for x in out.splitlines() if "recis: rank 0 at step" in x), None)
    assert line is not None, out[-3000:]
    assert verdict in line and f"collective_timeout {timeout} s" in line and "exiting with code 3" in line, line
    assert f"the last checkpoint is {job / 'checkpoints' / 'ckpt-3'}" in line, line
    assert (job / "checkpoints" / "latest").read_text() == "ckpt-3"
    if how == "sleep":
        # The checkpoint is intact: every part of it loads (in one process,
        # re-sharded; the resume under torchrun is the "stop" case's).
        sys.path.insert(0, HERE)
        try:
            import _dist_worker as w
        finally:
            sys.path.remove(HERE)
        from recis.framework import CheckpointManager

        model, dense_opt, sparse_opt = w.build()
        parts = ("sparse", "dense", "optimizer")
        tables = {t.name: t for t in model.tables()}
        manager = CheckpointManager.reading(str(job / "checkpoints"))
        step = manager.load(
            tables=tables, model=model, dense_optimizer=dense_opt, sparse_optimizer=sparse_opt, parts=parts
        )
        assert step == 3
        assert len(tables[TABLE]) > 0
        return
    # The checkpoint is intact: the run resumes from it to the uninterrupted end.
    torchrun(WORKER, str(tmp_path), "6", str(job))
    runs = request.getfixturevalue("runs")
    for rank in (0, 1):
        whole, resumed = result(runs, f"2-{rank}"), result(tmp_path, f"2-{rank}-resumed")
        for k in whole:
            assert torch.equal(whole[k], resumed[k]), (how, rank, k)


def test_collective_timeout_is_explicit_else_the_environment_else_five_minutes(monkeypatch):
    from recis.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S == 300
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert collective_timeout() == 12.5
    assert collective_timeout(7) == 7
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$RECIS_COLLECTIVE_TIMEOUT='soon': expected seconds"):
        collective_timeout()
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        collective_timeout(0)
