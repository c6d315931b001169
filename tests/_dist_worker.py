"""Trains a small DeepFM as one process or as a rank of torchrun, for
tests/test_distributed.py. Usage: _dist_worker.py OUT MAX_STEPS [RESUME_DIR]
or _dist_worker.py OUT load CHECKPOINT (loads the tables, dense state and
optimizers of CHECKPOINT, trains nothing, and writes result-<world>-<rank>-loaded)
or _dist_worker.py OUT engine (an EmbeddingEngine alone: result-<world>-<rank>-engine).

Global batch k has 2*B rows; under torchrun rank r trains on rows
[r*B, (r+1)*B) of it, one process on all of them. Each process writes what
it holds: result-<world>-<rank>.safetensors (every table's ids with their
embedding and frequency, the dense parameters) and metrics-<world>-<rank>.json.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from recis import distributed
from recis.framework import Trainer, TrainingArguments
from recis.models import DeepFM
from recis.nn import EmbeddingOption, EvictionOption, NormalInit, dense_only
from recis.nn.hash_table import HashTable
from recis.optim import SparseAdam
from recis.ragged import RaggedTensor, batch_rows

FIELDS = ["f0", "f1", "f2"]
B = 16


def global_batch(k: int, rows: int = 2 * B) -> dict:
    g = torch.Generator().manual_seed(1000 + k)
    batch = {}
    for j, f in enumerate(FIELDS):
        lengths = torch.randint(1, 4, (rows,), generator=g)
        # Zipf-like: small ids are common, so ranks share ids every step.
        ids = (torch.rand(int(lengths.sum()), generator=g) ** 3 * (40 + 20 * j)).long()
        batch[f] = RaggedTensor(ids, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    batch["dense"] = torch.randn(rows, 2, generator=g)
    score = batch["dense"][:, 0] + (batch["f0"].values[batch["f0"].offsets[:-1]] % 3 == 0).float()
    batch["label"] = (score + 0.3 * torch.randn(rows, generator=g) > 0.5).float()
    batch["user"] = torch.randint(0, 4, (rows,), generator=g)  # GAUC groups
    return batch


class Batches:
    """A resumable list of batches (the Trainer saves and restores its position)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def build():
    torch.manual_seed(0)
    options = {f: EmbeddingOption(dim=5, initializer=NormalInit(0.0, 0.05), seed=i) for i, f in enumerate(FIELDS)}
    model = DeepFM(options, num_dense=2, dim=4, hidden=(8,), seed=0)
    return model, torch.optim.Adam(model.parameters(), lr=0.01), SparseAdam(model, lr=0.05)


def dump(model, tables: dict, path: str) -> None:
    with dense_only():  # the dense parameters (the tables are dumped below, namespace by namespace)
        tensors = {f"dense.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for name, t in tables.items():
        state = t.state_dict()
        ns = state.get("namespace", torch.zeros_like(state["ids"]))
        for k, ns_name in enumerate(t.namespaces):
            # A coalesced table: each namespace (feature) by itself, since the
            # same id may be in several.
            mine = ns == k
            ids = state["ids"][mine]
            order = torch.argsort(ids)
            tensors[f"{name}:{ns_name}.ids"] = ids[order]
            tensors[f"{name}:{ns_name}.values"] = state["values"][mine][order].clone()
            tensors[f"{name}:{ns_name}.frequency"] = state["frequency"][mine][order]
    save_file(tensors, path)


def load_only(out: str, checkpoint: str) -> None:
    from recis.framework import CheckpointManager

    distributed.init_from_env()
    model, dense_opt, sparse_opt = build()
    tables = {t.name: t for t in model.tables()}
    CheckpointManager.reading(os.path.dirname(checkpoint)).load(
        checkpoint,
        tables=tables,
        model=model,
        dense_optimizer=dense_opt,
        sparse_optimizer=sparse_opt,
        parts=("sparse", "dense", "optimizer"),
    )
    dump(model, tables, os.path.join(out, f"result-{distributed.world()}-{distributed.rank()}-loaded.safetensors"))
    # A row cap is the whole table's: each of the ranks keeps its share.
    capped = HashTable(EmbeddingOption(dim=2, eviction=EvictionOption(max_rows=5)), "capped")
    capped.native.lookup_or_insert(np.arange(20, dtype=np.int64), 0)
    capped.evict()
    with open(os.path.join(out, f"capped-{distributed.rank()}.json"), "w") as f:
        json.dump({"rows": len(capped)}, f)


def engine_only(out: str) -> None:
    """tests/test_engine.py's features — two pooled alike, a mean one, a
    shared table and a sequence feature — trained 4 steps on a mean loss."""
    import test_engine as te

    from recis.nn import EmbeddingEngine

    distributed.init_from_env()
    rank, n = distributed.rank(), distributed.world()
    engine = EmbeddingEngine(te.options())
    # RECIS_TEST_IN_BACKWARD=1: the update runs inside backward, on the owners.
    in_backward = os.environ.get("RECIS_TEST_IN_BACKWARD") == "1"
    opt = SparseAdam(engine, lr=0.05, in_backward=in_backward)
    for raw, step, targets in te.batches(4, batch=8):
        feats = {f: RaggedTensor(raw[idx], offsets) for f, (idx, offsets) in step.items()}
        if n > 1:
            feats = batch_rows(feats, rank * 4, rank * 4 + 4)
            targets = batch_rows(targets, rank * 4, rank * 4 + 4)
        (te.loss_of(engine(feats), targets) / len(targets["a"])).backward()
        if in_backward:
            assert not any(t.pending_leaves() for t in engine.tables()), "the owners updated in backward"
        opt.step()
        opt.zero_grad()
    dump(
        torch.nn.Module(),
        {t.name: t for t in engine.tables()},
        os.path.join(out, f"result-{n}-{rank}-engine{'-inb' if in_backward else ''}.safetensors"),
    )


def kill_at(rank: int, spec: str) -> None:
    """RECIS_TEST_KILL="RANK,WHAT,K[,HOW]": SIGKILL rank RANK at the K-th call of
    WHAT — "table_save" (one table's shard of a checkpoint),
    "point_latest" (after the checkpoint's rename, before the pointer moves)
    or "sparse_step" (inside an optimizer step). HOW: "kill" (the default),
    "stop" (SIGSTOP: a rank that hangs) or "sleep" (sleeps for ever, the GIL
    released: a rank deadlocked in native code)."""
    import signal
    import time

    from recis.framework import CheckpointManager
    from recis.optim.sparse import SparseOptimizer

    who, what, k, how = (spec + ",kill").split(",")[:4]
    if int(who) != rank:
        return
    cls, name = {
        "table_save": (HashTable, "save"),
        "point_latest": (CheckpointManager, "_point_latest"),
        "sparse_step": (SparseOptimizer, "step"),
    }[what]
    original, calls = getattr(cls, name), [0]

    def deadly(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(k):
            if how == "sleep":
                while True:
                    time.sleep(60)
            os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(cls, name, deadly)


def main(out: str, max_steps: int, resume_dir: str | None = None) -> None:
    distributed.init_from_env()
    rank, n = distributed.rank(), distributed.world()
    with open(os.path.join(out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if os.environ.get("RECIS_TEST_KILL"):
        kill_at(rank, os.environ["RECIS_TEST_KILL"])
    model, dense_opt, sparse_opt = build()
    part = (lambda b: batch_rows(b, rank * B, (rank + 1) * B)) if n > 1 else (lambda b: b)
    accumulate = 2 if os.environ.get("RECIS_TEST_ACCUM") else 1
    fp16 = bool(os.environ.get("RECIS_TEST_FP16"))
    variant = ("-accum" if accumulate > 1 else "") + ("-fp16" if fp16 else "")
    train = Batches([part(global_batch(k)) for k in range(8)])
    if accumulate > 1:  # each step: two micro-batches of half the rows
        train = Batches([batch_rows(b, h * B // 2, (h + 1) * B // 2) for b in train.batches for h in (0, 1)])
    if os.environ.get("RECIS_TEST_NO_DATA") and rank == n - 1:
        train = Batches([])
    if os.environ.get("RECIS_TEST_NAN") and rank == n - 1:
        train.batches[3]["dense"][0, 0] = float("nan")  # this rank's 4th batch: a NaN loss at step 4
    # Evaluation rows split unevenly: rank 1 runs out a batch early.
    evals = [global_batch(100 + k, 24) for k in range(3)]
    if n > 1:
        evals = [batch_rows(b, 0, 12) if rank == 0 else batch_rows(b, 12, 24) for b in evals]
        if rank == 1:
            evals = evals[:2]
    else:
        evals = evals[:2] + [batch_rows(evals[2], 0, 12)]
    args = TrainingArguments(
        resume_dir or os.path.join(out, f"run-{n}{variant}"),
        max_steps=max_steps,
        gradient_accumulation_steps=accumulate,
        mixed_precision="fp16" if fp16 else None,
        save_every_steps=3,
        log_every_steps=2,
        group_key="user",
        tensorboard=False,
        plot=False,
        progress=False,
    )
    trainer = Trainer(
        model,
        args,
        train,
        evals,
        dense_optimizer=dense_opt,
        sparse_optimizer=sparse_opt,
    )
    logs = trainer.train()
    tag = f"{n}-{rank}" + ("-resumed" if resume_dir else "") + variant
    dump(model, trainer.tables, os.path.join(out, f"result-{tag}.safetensors"))
    with open(os.path.join(out, f"metrics-{tag}.json"), "w") as f:
        json.dump({"eval": logs["eval"], "step": trainer.global_step, "samples": train.pos}, f)


if __name__ == "__main__":
    if sys.argv[2] == "load":
        load_only(sys.argv[1], sys.argv[3])
    elif sys.argv[2] == "engine":
        engine_only(sys.argv[1])
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
