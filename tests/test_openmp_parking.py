"""The core parks torch's OpenMP team during its calls (recis-core's ``omp``
module): on by default where torch's libgomp is loaded, off with
``RECIS_OMP_PARK=0`` or ``OMP_WAIT_POLICY=passive``, and a training run
gives the same tables, bit for bit, with it on and off, at several torch
thread counts."""

import os
import subprocess
import sys

import pytest
import torch

from recis import RaggedTensor, _native
from recis.nn import EmbeddingEngine, EmbeddingOption, UniformInit
from recis.optim import SparseAdam

LINUX_GOMP = sys.platform.startswith("linux") and any(
    "libgomp" in line for line in open("/proc/self/maps", encoding="utf-8", errors="replace")
)
needs_gomp = pytest.mark.skipif(not LINUX_GOMP, reason="torch's libgomp is not loaded here: nothing to park")


def parking_in_child(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RECIS_OMP_PARK", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    code = "import torch, recis; from recis import _native; print(_native.openmp_parking())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@needs_gomp
def test_on_by_default_off_by_either_switch():
    assert parking_in_child({}) == "True"
    assert parking_in_child({"RECIS_OMP_PARK": "0"}) == "False"
    assert parking_in_child({"OMP_WAIT_POLICY": "PASSIVE"}) == "False"
    assert parking_in_child({"OMP_WAIT_POLICY": "PASSIVE", "RECIS_OMP_PARK": "1"}) == "True"


def train(seed: int, steps: int = 25) -> dict:
    """A coalesced engine of 6 features, Adam, a torch op (matmul) right
    before each lookup and each backward, so the team spins when the core is
    called; returns every table's ids and rows."""
    g = torch.Generator().manual_seed(seed)
    feats = [f"f{i}" for i in range(6)]
    engine = EmbeddingEngine({f: EmbeddingOption(dim=8, initializer=UniformInit(-0.1, 0.1)) for f in feats})
    opt = SparseAdam(engine, lr=0.01)
    head = torch.randn(48, 1, generator=g)
    for _ in range(steps):
        lengths = torch.randint(0, 4, (256,), generator=g)
        batch = {
            f: RaggedTensor.from_lengths(torch.randint(0, 5000, (int(lengths.sum()),), generator=g), lengths)
            for f in feats
        }
        torch.randn(512, 512) @ torch.randn(512, 512)
        out = engine.stacked(batch).flatten(1)
        loss = (out @ head).square().mean()
        torch.randn(512, 512) @ torch.randn(512, 512)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = engine.state_dict()
    return {k: v.clone() for k, v in state.items()}


@needs_gomp
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_training_is_the_same_parked_or_not(threads):
    before, was = torch.get_num_threads(), _native.openmp_parking()
    torch.set_num_threads(threads)
    try:
        assert _native.openmp_parking(True)
        r0 = _native.openmp_parked_regions()
        parked = train(seed=threads)
        r1 = _native.openmp_parked_regions()
        assert not _native.openmp_parking(False)
        spinning = train(seed=threads)
        r2 = _native.openmp_parked_regions()
    finally:
        _native.openmp_parking(was)
        torch.set_num_threads(before)
    # Each step's lookup, and its pooling and update, ran parked; off, none.
    assert r1 - r0 >= 25 * 2 and r2 == r1
    assert parked.keys() == spinning.keys() and parked
    for k in parked:
        assert torch.equal(parked[k], spinning[k]), k


def test_a_thread_other_than_the_main_one_is_not_parked():
    """Another thread would get a team of its own (every core) that then
    spins: the core parks only on the main thread."""
    import threading

    was = _native.openmp_parking(True)
    try:
        r0 = _native.openmp_parked_regions()
        box = {}
        t = threading.Thread(target=lambda: box.update(state=train(seed=9, steps=3)))
        t.start()
        t.join(120)
        assert not t.is_alive() and box["state"]
        assert _native.openmp_parked_regions() == r0
    finally:
        _native.openmp_parking(was)
