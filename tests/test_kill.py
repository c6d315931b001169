"""Crash safety: a training run SIGKILLed at random points — during steps
and inside checkpoint writes — and resumed each time ends with the same
dense and sparse parameters, having trained on the same batches in the same
order, as an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from recis.datagen import generate

CHILD = os.path.join(os.path.dirname(__file__), "_kill_child.py")


def run(data, out, *kill_at, kill_after=None):
    """Runs the child; kills it ``kill_after`` seconds after it is ready.
    Returns True if it finished."""
    p = subprocess.Popen(
        [sys.executable, CHILD, str(data), str(out), *map(str, kill_at)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "ready"
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=300)
    rest = p.stdout.read()
    print(kill_at, kill_after, p.returncode, [x for x in rest.splitlines() if "resumed" in x or "done" in x])
    return p.returncode == 0 and "done" in rest


def effective_batches(out):
    """Step -> digest of the batch trained at that step; a step replayed
    after a crash counts once, with its last digest."""
    steps = {}
    with open(os.path.join(out, "seen.jsonl")) as f:
        for line in f:
            step, digest = json.loads(line)
            steps[step] = digest
    return [steps[s] for s in sorted(steps)]


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    generate(str(data), 6000, files=3, vocab=4000, seed=2)
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run(data, whole)
    rng = random.Random(1234)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    # Inside checkpoint writes (the k-th save of a process, after j of its
    # ~30 files), and at random times (steps, saves, pointer updates, pruning).
    kills = [("save", 1, 0), ("time", 0.25), ("save", 2, 3), ("time", 0.5), ("save", 1, 15), ("time", 0.15)]
    kills += [("save", 2, 28)]
    kills += [("time", rng.uniform(0.05, 0.8)) for _ in range(3)]
    outcomes = []
    for kind, *how in kills:
        if kind == "save":
            finished = run(data, crashed, *how)
        else:
            finished = run(data, crashed, kill_after=how[0])
        outcomes.append(finished)
        if finished:
            break
    assert not any(outcomes[:3]), "the first kills must interrupt the run"
    if not outcomes[-1]:
        assert run(data, crashed)  # and then it is left to finish
    a, b = load_file(whole / "final.safetensors"), load_file(crashed / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert effective_batches(whole) == effective_batches(crashed)
    leftovers = [e for e in os.listdir(crashed / "checkpoints") if e.startswith(".tmp")]
    assert not leftovers, leftovers
