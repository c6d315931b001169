"""The watchdog of ranks that hang: a heartbeat through the c10d store and a
thread that makes the job exit, naming the rank at fault, when one stops.

It owns each rank's heartbeat record in the store and the decision to end
the process; it must not touch the model, the data or the checkpoints. It
ends the process with ``os._exit(EXIT_HUNG)``, since the main thread may be
stuck inside a collective that never returns; a checkpoint survives that as
it survives a SIGKILL (written under a temporary name, then renamed), and
torchrun, seeing a worker fail, stops the others.

Each rank's main thread publishes its step as it completes it (``beat``: a
store ``set``, which does not wait for an answer). Every ``interval``
seconds its thread publishes ``tick entered inside`` (a counter that says
it is alive, the collectives the main thread has entered and whether it is
inside one), then reads the other ranks' records and notes when each last
changed. The rank exits, with one line on stderr that names the rank, the
step and the timeout, when:

- a peer's tick has not changed for ``timeout`` seconds: it is stopped
  (SIGSTOP), cut off, gone or holds the GIL — "rank R has been silent since
  step S (N s)";
- its own main thread has been inside one collective for ``timeout`` +
  ``interval`` seconds (gloo's own timeout, the same ``timeout``, normally
  comes first), or a collective raised (that timeout, or a lost
  connection): a silent peer is named as above; else the ranks that entered
  fewer collectives than the others, which wait for them — "rank R has made
  no progress since step S (N s)".

``timeout`` must exceed the longest a rank spends between two collectives
(a checkpoint save, the slowest batch): gloo refuses that wait as well.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_HUNG = 3
"""The exit status of a process the watchdog ends."""

# Errors of a collective whose cause is another rank: gloo's timeout and a
# peer's connection lost (gloo's tcp transport, c10d's store).
_PEER_ERROR = re.compile(r"[Tt]imed out|[Tt]imeout|[Cc]onnection (closed|reset|refused)|Broken pipe|gloo")


class Watchdog:
    """One rank's heartbeat (see the module docstring).

    ``collectives``: a function giving (collectives entered, the monotonic
    time the one the main thread is in began, or None); ``last_checkpoint``:
    a function giving the path named in the message; ``step``: the step it
    starts at.
    """

    def __init__(self, timeout: float, rank: int, world: int, collectives, last_checkpoint=None, step: int = 0):
        self.timeout = float(timeout)
        self.rank, self.world = rank, world
        self.collectives, self.last_checkpoint = collectives, last_checkpoint
        self.step = step
        self.interval = min(max(self.timeout / 10, 0.2), 5.0)
        # One connection for the thread, one for the main thread's beats, so
        # that neither waits on the other's call when the store is cut off.
        self.store = _client_store(2 * self.interval)
        self._beats = _client_store(2 * self.interval)
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        Watchdog._generation += 1  # a second Trainer.train in one process: fresh keys
        self._prefix = f"recis/heartbeat/{run}/{attempt}/{Watchdog._generation}/"
        self._tick = 0
        self._seen: dict[int, list] = {}  # peer -> its record's fields
        self._alive: dict[int, float] = {}  # peer -> when its tick last changed
        self._moved: dict[int, float] = {}  # rank -> when its (step, entered) last changed
        self._store_failing: float | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._exiting = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="recis-watchdog", daemon=True)

    _generation = 0

    def start(self) -> Watchdog:
        self.beat(self.step)
        self._publish()
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """The main thread completed ``step``."""
        self.step = step
        try:
            self._beats.set(self._key(self.rank) + ".step", str(step))
        except Exception:  # noqa: BLE001 - a store cut off: the thread reports it
            pass

    def stop(self) -> None:
        """Stops watching; the peers stop expecting this rank's beats."""
        self._stop.set()
        self._thread.join()
        try:
            self.store.set(self._key(self.rank), f"done {self.collectives()[0]} 0")
        except Exception:  # noqa: BLE001 - the peers then see silence, as from a rank that exited
            pass

    # -- the thread ---------------------------------------------------------------

    def _key(self, rank: int) -> str:
        return f"{self._prefix}{rank}"

    def _publish(self) -> None:
        self._tick += 1
        entered, since = self.collectives()
        self.store.set(self._key(self.rank), f"{self._tick} {entered} {int(since is not None)}")

    def _read(self, now: float) -> None:
        for r in range(self.world):
            if r != self.rank and r not in self._seen and self.store.check([self._key(r)]):
                self._seen[r] = None
        peers = sorted(self._seen)
        if not peers:
            return
        keys = [self._key(r) for r in peers] + [self._key(r) + ".step" for r in peers]
        got = self.store.multi_get(keys)
        for r, raw, step in zip(peers, got[: len(peers)], got[len(peers) :], strict=True):
            tick, entered, inside = raw.decode().split()
            record = [tick, int(step), int(entered), inside == "1"]
            old = self._seen[r]
            if old is None or old[0] != tick:
                self._alive[r] = now
            if old is None or old[1:3] != record[1:3]:
                self._moved[r] = now
            self._seen[r] = record

    def _run(self) -> None:
        me = (self.step, self.collectives()[0])
        self._started = self._moved[self.rank] = time.monotonic()
        # A first look soon, once the peers (which start in step with this
        # rank) have published theirs; then every interval.
        wait = min(0.2, self.interval)
        while not self._stop.wait(wait):
            wait = self.interval
            now = time.monotonic()
            try:
                self._publish()
                self._read(now)
                self._store_failing = None
            except Exception:  # noqa: BLE001 - a store that does not answer is a symptom to report
                if self._store_failing is None:
                    self._store_failing = now
            now = time.monotonic()
            if (self.step, self.collectives()[0]) != me:
                me = (self.step, self.collectives()[0])
                self._moved[self.rank] = now
            silent = [r for r in _live(self._seen) if now - self._alive[r] > self.timeout]
            since = self.collectives()[1]
            if silent or (since is not None and now - since > self.timeout + self.interval):
                self.fail()

    # -- the verdict ----------------------------------------------------------------

    def verdict(self, now: float | None = None) -> str:
        """Who holds the job up, from the records read so far."""
        now = time.monotonic() if now is None else now
        # Copies: the thread may be updating them (this runs on either thread).
        seen, alive, moved = dict(self._seen), dict(self._alive), dict(self._moved)
        silent = [r for r in _live(seen) if now - alive[r] > 3 * self.interval]
        if silent:
            parts = [
                f"rank {r} has been silent since step {seen[r][1]} ({now - alive[r]:.0f} s)"
                for r in sorted(silent, key=lambda r: alive[r])
            ]
            if self._store_failing is not None:
                parts.append(
                    f"the store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} has not answered "
                    f"for {now - self._store_failing:.0f} s"
                )
            return "; ".join(parts)
        left = [r for r, rec in seen.items() if rec is not None and rec[0] == "done"]
        if left:
            return "; ".join(f"rank {r} has left training at step {seen[r][1]}" for r in sorted(left))
        entered = {r: rec[2] for r, rec in seen.items() if rec is not None}
        entered[self.rank] = self.collectives()[0]
        steps = {r: rec[1] for r, rec in seen.items() if rec is not None}
        steps[self.rank] = self.step
        behind = [r for r, n in entered.items() if n < max(entered.values())]
        if behind:
            return "; ".join(
                f"rank {r} has made no progress since step {steps[r]} ({now - moved.get(r, now):.0f} s): "
                "the other ranks wait for it in a collective"
                for r in sorted(behind)
            )
        missing = sorted(set(range(self.world)) - set(entered))
        if missing:
            return "; ".join(
                f"rank {r} has not been heard from since this rank began training ({now - self._started:.0f} s)"
                for r in missing
            )
        return (
            f"every rank has waited in a collective since step {min(steps.values())} "
            f"({now - max(moved.values()):.0f} s) and none is behind: they wait in different collectives, "
            "or the network between them is cut"
        )

    def fail(self, error: BaseException | None = None) -> None:
        """Writes the verdict on stderr and ends the process (it does not return)."""
        with self._exiting:
            why = self.verdict()
            if error is not None:
                # gloo's messages start with its source file: "[.../unbound_buffer.cc:78] Timed out ..."
                first = re.sub(r"^\[[^\]]*\] ", "", (str(error).strip().splitlines() or [""])[0])[:300]
                why += f" (a collective raised {type(error).__name__}: {first})"
            last = self.last_checkpoint() if self.last_checkpoint is not None else None
            print(
                f"recis: rank {self.rank} at step {self.step}: {why}; collective_timeout {self.timeout:g} s; "
                f"exiting with code {EXIT_HUNG}; the last checkpoint is {last or 'none (none was saved)'}",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os._exit(EXIT_HUNG)

    @staticmethod
    def is_peer_error(error: BaseException) -> bool:
        """Whether ``error``, raised in a collective, comes from another rank
        (a timeout, a lost connection) rather than from this one."""
        return isinstance(error, getattr(dist, "DistError", ())) or (
            isinstance(error, RuntimeError) and bool(_PEER_ERROR.search(str(error)))
        )


def _live(seen: dict) -> list[int]:
    """The peers heard from that have not left."""
    return [r for r, rec in seen.items() if rec is not None and rec[0] != "done"]


def _client_store(timeout_s: float):
    """A connection of its own to the job's store (torchrun's
    MASTER_ADDR:MASTER_PORT), with a short timeout, so that a store that
    does not answer delays the thread by ``timeout_s`` at most; else (no
    such address, or none answering) the process group's store."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        try:
            return dist.TCPStore(
                addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
            )
        except (RuntimeError, ValueError):
            pass
    return dist.distributed_c10d._get_default_store()
