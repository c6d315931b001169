"""A training run for tests/test_kill.py: DeepFM through the ORC reader and
the Trainer, checkpointing every 2 steps, resuming from its latest
checkpoint. Usage: _kill_child.py DATA_DIR OUT_DIR [KILL_AT_SAVE KILL_AFTER_FILES]

With KILL_AT_SAVE=k, the process SIGKILLs itself inside its k-th checkpoint
write, after KILL_AFTER_FILES files of it. Each step appends (step, digest of
the batch) to OUT_DIR/seen.jsonl; at the end the parameters go to
OUT_DIR/final.safetensors."""

import hashlib
import json
import os
import signal
import sys
import time

import safetensors.torch
import torch
from safetensors.torch import save_file

import recis.framework.checkpoint as ckpt
from recis.datagen import DENSE_COLUMNS, SPARSE_FIELDS, to_model_input
from recis.framework import Trainer, TrainingArguments
from recis.io import OrcDataset
from recis.models import DeepFM
from recis.optim import SparseAdam


def main():
    data_dir, out = sys.argv[1], sys.argv[2]
    kill_at = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    if kill_at is not None:
        saves, files = [0], [0]
        real_save, real_file = ckpt.CheckpointManager.save, safetensors.torch.save_file

        def counting_save(self, *a, **kw):
            saves[0] += 1
            files[0] = 0
            return real_save(self, *a, **kw)

        def dying_file(tensors, path, *a, **kw):
            # Every safetensors file a checkpoint writes (table chunks, dense,
            # optimizer, RNG) goes through here.
            if saves[0] == kill_at[0] and files[0] == kill_at[1]:
                os.kill(os.getpid(), signal.SIGKILL)
            files[0] += 1
            return real_file(tensors, path, *a, **kw)

        ckpt.CheckpointManager.save = counting_save
        ckpt.save_file = safetensors.torch.save_file = dying_file
    torch.manual_seed(0)
    model = DeepFM(SPARSE_FIELDS, num_dense=13, dim=8, hidden=(32, 16), seed=0)
    ds = OrcDataset(data_dir, 400, ["label", *DENSE_COLUMNS, *SPARSE_FIELDS], shuffle=True, seed=5)
    args = TrainingArguments(out, epochs=2, save_every_steps=2, keep_checkpoints=2, log_every_steps=1)
    seen = open(os.path.join(out, "seen.jsonl"), "a")
    holder = {}

    def input_fn(batch):
        digest = hashlib.sha256(b"".join(batch[f].values.numpy().tobytes() for f in SPARSE_FIELDS)).hexdigest()
        seen.write(json.dumps([holder["t"].global_step + 1, digest]) + "\n")
        seen.flush()
        time.sleep(0.03)  # room for the parent's random kills to land inside steps
        return to_model_input(batch)

    t = Trainer(
        model,
        args,
        ds,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        sparse_optimizer=SparseAdam(model, lr=3e-2),
        input_fn=input_fn,
    )
    holder["t"] = t
    print("ready", flush=True)
    t.train()
    final = {f"dense.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for table in model.tables():
        sd = table.state_dict()
        order = torch.argsort(sd["ids"])
        final[f"{table.name}.ids"] = sd["ids"][order]
        final[f"{table.name}.values"] = sd["values"][order]
    save_file(final, os.path.join(out, "final.safetensors"))
    print(f"done {t.global_step}", flush=True)


if __name__ == "__main__":
    main()
