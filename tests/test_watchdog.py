"""The watchdog's verdicts from the records in a store, with the peer's
records written by hand and the clock given (no torchrun: the end-to-end
runs are tests/test_distributed.py and tests/test_multihost.py)."""

import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from recis.distributed.watchdog import Watchdog

T = 10.0


@pytest.fixture
def store(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return server


def rank0(entered=6, inside_since=None):
    """Rank 0 of 2, its thread not started: the tests drive ``_read``."""
    dog = Watchdog(T, 0, 2, lambda: (entered, inside_since), lambda: "ckpt-3", step=5)
    dog.beat(5)
    dog._publish()
    return dog


def settled(dog, key, value):
    """Waits (at most 5 s) until the watchdog's own store connection reads
    ``value`` at ``key``: under load, a set through one TCPStore connection
    can reach another connection's reads a moment later, and a test that
    reads at once saw the old record (flaky before this)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if dog.store.check([key]) and dog.store.get(key).decode() == value:
            return
        time.sleep(0.005)
    raise AssertionError(f"the store never showed {key} = {value!r}")


def put(store, dog, key, value):
    store.set(key, value)
    settled(dog, key, value)


def peer(store, dog, tick, step, entered, inside=0):
    put(store, dog, dog._key(1) + ".step", str(step))
    put(store, dog, dog._key(1), f"{tick} {entered} {inside}")


def test_a_peer_whose_tick_stops_is_silent_since_its_last_step(store):
    dog = rank0()
    peer(store, dog, 1, 4, 5)
    dog._read(100.0)
    peer(store, dog, 1, 4, 5)  # the same record: no new tick
    dog._read(104.0)
    assert dog.verdict(100.0 + T + 1) == "rank 1 has been silent since step 4 (11 s)"


def test_a_live_peer_behind_in_collectives_is_the_one_the_others_wait_for(store):
    dog = rank0(entered=6)
    peer(store, dog, 1, 4, 5)
    dog._read(100.0)
    peer(store, dog, 2, 4, 5)  # ticking, but no further
    dog._read(110.0)
    assert dog.verdict(110.5) == (
        "rank 1 has made no progress since step 4 (10 s): the other ranks wait for it in a collective"
    )


def test_a_peer_that_left_and_one_never_heard_from(store):
    dog = rank0()
    dog._started = 100.0
    dog._moved[0] = 100.0
    assert dog.verdict(112.0) == "rank 1 has not been heard from since this rank began training (12 s)"
    put(store, dog, dog._key(1) + ".step", "4")
    put(store, dog, dog._key(1), "done 6 0")
    dog._read(112.0)
    assert dog.verdict(113.0) == "rank 1 has left training at step 4"


def test_ranks_level_in_collectives_wait_in_different_ones(store):
    dog = rank0(entered=6)
    dog._moved[0] = 100.0
    peer(store, dog, 1, 5, 6)
    dog._read(100.0)
    peer(store, dog, 2, 5, 6)
    dog._read(111.0)
    assert dog.verdict(111.0).startswith("every rank has waited in a collective since step 5 (11 s) and none is behind")


def test_which_errors_come_from_another_rank():
    assert Watchdog.is_peer_error(RuntimeError("[pair.cc:534] Timed out waiting 10000ms for recv operation"))
    assert Watchdog.is_peer_error(RuntimeError("Connection reset by peer"))
    assert Watchdog.is_peer_error(dist.DistNetworkError("store cut off"))
    assert not Watchdog.is_peer_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not Watchdog.is_peer_error(ValueError("timed out"))
