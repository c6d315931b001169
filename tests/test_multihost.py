"""Two hosts on one machine: two network namespaces joined by a veth pair,
each running ``torchrun --nnodes 2 --nproc-per-node 1`` with a c10d
rendezvous and ``recis train``. (Two such networks, so that the
uninterrupted run overlaps the cut one's wait.)

- the two hosts train as one process does on the same samples (each rank's
  batch of B rows is one 256-row file, dealt out by stripe; one process
  reads the files in order in batches of 2B);
- the link cut mid-training (``ip link set ... down``): both ranks exit
  within the timeout, each naming the other as silent;
- resumed from the last checkpoint, the run ends bit-identical to the
  uninterrupted one.

Skipped, with the reason, where namespaces cannot be made (not root, no
``ip``, no permission); the namespaces go at teardown, even on failure.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from recis.datagen import generate
from recis.nn import dense_only

PY = sys.executable
TIMEOUT = 10  # collective_timeout of the cut run
B = 256
FILES = 8
CONFIG = """
[data]
train = [{train}]
dense = ["I1", "I2", "I3"]
dense_transform = "log1p"
batch_size = {batch}
shuffle = false

[model]
name = "deepfm"
dim = 4
hidden = [8]

[optimizer]
sparse_lr = 0.01
dense_lr = 0.01

[trainer]
output_dir = "{out}"
max_steps = {steps}
epochs = 1000
log_every_steps = 20
save_every_steps = 20
keep_checkpoints = 100

[[feature]]
name = "C1"
[[feature]]
name = "C2"
[[feature]]
name = "C3"
"""
STEPS = 100


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def networks():
    """Two networks, each two namespaces (hosts ``a`` 10.77.N.1 and ``b``
    10.77.N.2) joined by a veth pair; yields [(namespaces, veths)] * 2."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    tag = os.getpid() % 100000
    made, nets = [], []
    try:
        for n in range(2):
            names = [f"recis-{tag}-{n}{h}" for h in "ab"]
            veths = [f"rv{n}{h}{tag}" for h in "ab"]
            for ns in names:
                got = ip("netns", "add", ns, check=False)
                if got.returncode != 0:
                    pytest.skip(f"`ip netns add` failed: {got.stderr.strip()}")
                made.append(ns)
            ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
            for k, (ns, veth) in enumerate(zip(names, veths, strict=True)):
                ip("link", "set", veth, "netns", ns)
                ip("-n", ns, "addr", "add", f"10.77.{n}.{k + 1}/24", "dev", veth)
                ip("-n", ns, "link", "set", veth, "up")
                ip("-n", ns, "link", "set", "lo", "up")
            nets.append((names, veths))
        yield nets
    finally:
        for ns in made:
            # Whatever this test started in the namespace, then the namespace
            # (its veth goes with it).
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", ns, check=False)


def job_config(d, out, batch, steps=STEPS) -> str:
    files = ", ".join(f'"{d}/data/part-{k:05d}.orc"' for k in range(FILES))
    path = d / f"{out}.toml"
    path.write_text(CONFIG.format(train=files, batch=batch, out=d / out, steps=steps))
    return str(path)


class Job:
    """``recis train`` on both hosts of ``net``: two torchrun processes,
    their output in ``d/<name>-{a,b}.log``."""

    def __init__(self, net, d, name: str, config: str, timeout: float = 60):
        names, veths = net
        self.logs = [d / f"{name}-{h}.log" for h in "ab"]
        self.procs = []
        n = names[0].rsplit("-", 1)[1][0]  # the network's number
        for k, (ns, veth, log) in enumerate(zip(names, veths, self.logs, strict=True)):
            env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=veth)
            cmd = ["ip", "netns", "exec", ns, PY, "-m", "torch.distributed.run", "--nnodes", "2"]
            cmd += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"10.77.{n}.1:29477"]
            # Host a owns the rendezvous store (torchrun cannot tell by the
            # hostname, which both namespaces share).
            cmd += ["--rdzv-id", name, "--rdzv-conf", f"is_host={int(k == 0)},read_timeout=10"]
            cmd += ["--local-addr", f"10.77.{n}.{k + 1}", "-m", "recis.cli", "train", "--config", config]
            cmd += ["--threads", "1", "--collective-timeout", str(timeout)]
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))

    def output(self) -> str:
        return "".join(log.read_text() for log in self.logs)

    def wait(self, timeout: float = 120) -> list[int]:
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(self.output()[-4000:]) from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def trained_state(config: str, checkpoint) -> dict:
    """A checkpoint's tables (rows sorted by id) and dense state, loaded into one process."""
    from recis.config import Job, load_config
    from recis.framework import CheckpointManager

    job = Job(load_config(config), for_training=False)
    tables = job.trainer.tables
    CheckpointManager.reading(os.path.dirname(checkpoint)).load(
        str(checkpoint), tables=tables, model=job.model, parts=("sparse", "dense")
    )
    with dense_only():
        out = {f"dense.{k}": v for k, v in job.model.state_dict().items()}
    for name, t in tables.items():
        s = t.state_dict()
        ns = s.get("namespace", torch.zeros_like(s["ids"]))
        order = torch.from_numpy(np.lexsort((s["ids"].numpy(), ns.numpy())))
        for part in ("ids", "values", "frequency"):
            out[f"{name}.{part}"] = s[part][order]
    return out


def first_loss(out_dir) -> float:
    """The mean loss of the first 20 steps (the first log record)."""
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return next(json.loads(x) for x in lines if '"loss"' in x)["loss"]


def test_two_hosts_train_as_one_process_survive_a_cut_link_and_resume_exactly(networks, tmp_path):
    generate(str(tmp_path / "data"), FILES * B, files=FILES, vocab=500, seed=0)
    t0 = time.monotonic()
    # On network 0: the job whose link is cut once it has saved ckpt-20;
    # beside it, one process on the same samples.
    cut = job_config(tmp_path, "cut", B)
    job = Job(networks[0], tmp_path, "cut", cut, timeout=TIMEOUT)
    one = job_config(tmp_path, "one", 2 * B)
    single = subprocess.Popen(
        [PY, "-m", "recis.cli", "train", "--config", one, "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    ckpts = tmp_path / "cut" / "checkpoints"
    end = time.monotonic() + 120
    while not (ckpts / "ckpt-20").exists():
        assert time.monotonic() < end and all(p.poll() is None for p in job.procs), job.output()[-4000:]
        time.sleep(0.02)
    (names, veths) = networks[0]
    ip("-n", names[0], "link", "set", veths[0], "down")
    t_cut = time.monotonic()
    # The uninterrupted job, on network 1, while the cut one waits.
    two = job_config(tmp_path, "two", B)
    whole = Job(networks[1], tmp_path, "two", two)
    # Both ranks of the cut job exit, each naming the other (torchrun passes
    # the workers' stderr through).
    seen = {}
    while len(seen) < 2:
        for k, log in enumerate(job.logs):
            for line in log.read_text().splitlines():
                if line.startswith("recis: rank ") and " at step " in line and k not in seen:
                    seen[k] = (line, time.monotonic() - t_cut)
        assert time.monotonic() - t_cut < TIMEOUT + 20, (seen, job.output()[-4000:])
        time.sleep(0.1)
    for line, after in seen.values():
        assert after < TIMEOUT + 15, (after, line)
        mine = int(line.split("recis: rank ")[1].split()[0])
        assert f"rank {1 - mine} has been silent since step " in line, line
        assert f"collective_timeout {TIMEOUT} s; exiting with code 3" in line, line
    job.kill()  # the workers are gone; an agent may still try to reach the rendezvous
    ip("-n", names[0], "link", "set", veths[0], "up")
    latest = (ckpts / "latest").read_text()
    assert 20 <= int(latest.split("-")[1]) < STEPS, latest
    # Resumed from its last checkpoint, on the mended link.
    resumed = Job(networks[0], tmp_path, "resume", cut)
    assert single.wait(timeout=120) == 0, single.stderr.read()[-3000:]
    assert whole.wait() == [0, 0]
    assert resumed.wait() == [0, 0]
    assert f"resumed from {ckpts / latest}" in resumed.output()

    # Two hosts as one process, at step 20 (as tests/test_distributed.py
    # compares them): ids and frequencies exact; values to the rounding of
    # float32 sums taken in another order (batches of B and of 2B).
    a = trained_state(two, tmp_path / "two" / "checkpoints" / "ckpt-20")
    b = trained_state(one, tmp_path / "one" / "checkpoints" / "ckpt-20")
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith((".ids", ".frequency")):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert first_loss(tmp_path / "two") == pytest.approx(first_loss(tmp_path / "one"), rel=1e-5)
    # The resumed run ends bit-identical to the uninterrupted one.
    a = trained_state(two, tmp_path / "two" / "checkpoints" / f"ckpt-{STEPS}")
    c = trained_state(cut, ckpts / f"ckpt-{STEPS}")
    for k in a:
        assert torch.equal(a[k], c[k]), k
    print(f"cut at {t_cut - t0:.1f} s; total {time.monotonic() - t0:.1f} s")
