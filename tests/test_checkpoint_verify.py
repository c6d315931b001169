"""Checkpoint verification: checksums, headers, confined file names, the
last good checkpoint under NaN, fallback past damage, the output_dir lock,
and messages that name the file. Real files, damaged on disk."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from recis.framework import CheckpointError, CheckpointManager, Trainer, TrainingArguments, TrainingError
from recis.framework import checkpoint as ckpt_module
from recis.nn import DynamicEmbedding, EmbeddingOption, NormalInit
from recis.optim import SparseAdam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = DynamicEmbedding(EmbeddingOption(dim=4, initializer=NormalInit(0, 0.1), seed=1), "emb")
        self.head = nn.Linear(4, 1)

    def forward(self, batch):
        return self.head(self.emb(batch["ids"])).squeeze(1)


def small(optimizer=torch.optim.Adam):
    torch.manual_seed(0)
    m = Small()
    return m, SparseAdam(m, lr=0.05), optimizer(m.head.parameters(), lr=0.05)


def batch(*ids):
    return {"ids": torch.tensor([list(ids)]), "label": torch.tensor([1.0])}


def trained(steps=2):
    m, sp, de = small()
    for k in range(steps):
        F.binary_cross_entropy_with_logits(m(batch(k, k + 1)), torch.tensor([1.0])).backward()
        sp.step()
        de.step()
        sp.zero_grad()
        de.zero_grad()
    return m, sp, de


def parts(m, sp, de):
    return dict(tables={"emb": m.emb.table}, model=m, dense_optimizer=de, sparse_optimizer=sp)


def saved(tmp_path, steps=(2,)):
    """A manager of ``tmp_path/checkpoints`` holding a checkpoint a step."""
    m, sp, de = trained()
    manager = CheckpointManager(str(tmp_path / "checkpoints"), keep_last=5)
    for step in steps:
        manager.save(step, **parts(m, sp, de))
    return manager


def tensor_offset(file, name):
    """The byte offset in ``file`` of the tensor ``name``'s data."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def flip_bit(file, offset, bit=0):
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def read_meta(path):
    return ckpt_module._read_meta(os.path.join(path, "meta.json"))


def rewrite_meta(path, meta, checksummed=True):
    """meta.json rewritten, with its own digest (as a forger could) or as an
    old checkpoint without any."""
    file = os.path.join(path, "meta.json")
    if checksummed:
        ckpt_module._write_meta(meta, file)
    else:
        with open(file, "w") as f:
            json.dump(meta, f)


def as_old_checkpoint(path):
    """The checkpoint as one written before checksums (and suspect marks)."""
    meta = read_meta(path)
    for key in ("checksums", "suspect"):
        meta.pop(key, None)
    meta.get("dense_optimizer", {}).pop("class", None)
    rewrite_meta(path, meta, checksummed=False)


def fresh_parts():
    m, sp, de = small()
    return m, parts(m, sp, de)


# -- checksums -----------------------------------------------------------------


@pytest.mark.parametrize(
    "file, tensor",
    [("table-emb.00000.safetensors", "ids"), ("table-emb.00000.safetensors", "values"), ("dense.safetensors", None)],
)
def test_a_flipped_bit_is_refused_before_anything_loads(tmp_path, file, tensor):
    path = saved(tmp_path).latest()
    target = os.path.join(path, file)
    tensor = tensor or sorted(read_meta(path)["dense_keys"])[0]
    flip_bit(target, tensor_offset(target, tensor) + 1, bit=3)
    m, state = fresh_parts()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{file}: checksum mismatch \(xxh3-128 .*the file changed"):
        CheckpointManager(str(tmp_path / "checkpoints")).load(path, **state)
    assert len(m.emb.table) == 0  # nothing was loaded
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_file_is_checksummed_in_meta_json(tmp_path):
    path = saved(tmp_path).latest()
    meta = read_meta(path)
    assert meta["checksums"]["algorithm"] == "xxh3-128"
    written = sorted(set(os.listdir(path)) - {"meta.json"})
    assert sorted(meta["checksums"]["files"]) == written
    for name, entry in meta["checksums"]["files"].items():
        assert entry["bytes"] == os.path.getsize(os.path.join(path, name))
        assert len(entry["digest"]) == 32
    # meta.json's own digest: one changed byte in it is refused too.
    text = open(os.path.join(path, "meta.json")).read()
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write(text.replace('"step": 2', '"step": 3'))
    with pytest.raises(CheckpointError, match=r"meta.json: checksum mismatch"):
        ckpt_module.verify_checkpoint(path)


def test_old_checkpoints_without_checksums_load_with_one_warning(tmp_path, caplog):
    manager = saved(tmp_path)
    path = manager.latest()
    as_old_checkpoint(path)
    caplog.set_level(logging.WARNING, "recis.checkpoint")
    for _ in range(2):
        m, state = fresh_parts()
        assert manager.load(path, **state) == 2
        assert len(m.emb.table) > 0
    unverified = [r for r in caplog.records if "without checksums" in r.getMessage()]
    assert len(unverified) == 1 and path in unverified[0].getMessage()


# -- fallback ------------------------------------------------------------------


def damage(path, how):
    dense = os.path.join(path, "dense.safetensors")
    if how == "flipped bit":
        flip_bit(dense, os.path.getsize(dense) - 1)
    elif how == "no meta.json":
        os.remove(os.path.join(path, "meta.json"))
    elif how == "invalid meta.json":
        with open(os.path.join(path, "meta.json"), "r+b") as f:
            f.write(b"[")
    elif how == "missing file":
        os.remove(os.path.join(path, "table-emb.00000.safetensors"))
    elif how == "bad header":  # a header that claims 2^40 bytes, in an old checkpoint
        as_old_checkpoint(path)
        with open(dense, "r+b") as f:
            f.write((1 << 40).to_bytes(8, "little"))


REASONS = {
    "flipped bit": "dense.safetensors: checksum mismatch",
    "no meta.json": "not a complete checkpoint (no meta.json)",
    "invalid meta.json": "meta.json: not valid JSON (line 1, column",
    "missing file": "table-emb.00000.safetensors: missing",
    "bad header": "dense.safetensors: not a valid safetensors file: the header claims 1099511627776 bytes",
}


@pytest.mark.parametrize("how", list(REASONS))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, how):
    manager = saved(tmp_path, steps=(2, 4))
    newest = os.path.join(manager.directory, "ckpt-4")
    damage(newest, how)
    caplog.set_level(logging.WARNING, "recis.checkpoint")
    m, state = fresh_parts()
    assert manager.load(**state) == 2
    assert manager.loaded.endswith("ckpt-2") and [p for p, _ in manager.skipped] == [newest]
    warned = [r.getMessage() for r in caplog.records if "skipping the damaged checkpoint" in r.getMessage()]
    assert len(warned) == 1 and newest in warned[0] and REASONS[how] in warned[0], warned
    # Named explicitly, the damaged one is refused with the same reason.
    with pytest.raises(CheckpointError, match=REASONS[how].replace("(", r"\(").replace(")", r"\)")):
        manager.load(newest, **fresh_parts()[1])


def test_a_resumed_trainer_sets_damaged_checkpoints_aside_and_saves_their_steps_again(tmp_path, capsys):
    data = [batch(1, 2), batch(3, 4)] * 3
    args = dict(save_every_steps=2, log_every_steps=1, progress=False)
    m, sp, de = small()
    Trainer(
        m, TrainingArguments(str(tmp_path), max_steps=4, **args), data, dense_optimizer=de, sparse_optimizer=sp
    ).train()
    ckpts = tmp_path / "checkpoints"
    damage(str(ckpts / "ckpt-4"), "missing file")
    m, sp, de = small()
    t = Trainer(m, TrainingArguments(str(tmp_path), max_steps=6, **args), data, dense_optimizer=de, sparse_optimizer=sp)
    t.train()
    out = capsys.readouterr().out
    assert f"skipped the damaged checkpoint {ckpts / 'ckpt-4'}" in out
    assert f"resumed from {ckpts / 'ckpt-2'} at step 2" in out
    assert t.global_step == 6 and (ckpts / "ckpt-4.damaged").is_dir()
    assert [os.path.basename(p) for p in t.checkpoints.checkpoints()] == ["ckpt-2", "ckpt-4", "ckpt-6"]
    ckpt_module.verify_checkpoint(str(ckpts / "ckpt-4"))


def test_when_no_checkpoint_verifies_resuming_is_refused_with_each_reason(tmp_path):
    manager = saved(tmp_path, steps=(2, 4))
    damage(os.path.join(manager.directory, "ckpt-2"), "missing file")
    damage(os.path.join(manager.directory, "ckpt-4"), "flipped bit")
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies \(.*ckpt-4/dense.safetensors.*ckpt-2/table"):
        manager.load(**fresh_parts()[1])


# -- confinement ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("../outside.safetensors", "contains '/'"),
        ("..", "contains '..'"),
        ("/etc/hostname", "is an absolute path"),
        ("sub/table.safetensors", "contains '/'"),
        ("table\0.safetensors", "contains NUL"),
    ],
)
@pytest.mark.parametrize("checksummed", [True, False])
def test_a_table_file_name_outside_the_checkpoint_is_refused(tmp_path, name, why, checksummed):
    path = saved(tmp_path).latest()
    save_file({"ids": torch.zeros(1, dtype=torch.int64)}, str(tmp_path / "checkpoints" / "outside.safetensors"))
    meta = read_meta(path)
    meta["tables"]["emb"]["files"] = [name]
    if not checksummed:
        meta.pop("checksums")
    rewrite_meta(path, meta, checksummed=checksummed)
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(str(tmp_path / "checkpoints")).load(path, **fresh_parts()[1])
    msg = str(e.value)
    assert f"{path}/meta.json: table 'emb' names file {name!r}, which {why}" in msg
    assert f"plain names inside {path}" in msg


# -- the last good checkpoint ----------------------------------------------------


def test_nan_in_a_table_names_the_truly_last_good_checkpoint_which_pruning_keeps(tmp_path, caplog):
    """The probe of issue 13: a NaN in a row that no batch reads for 15
    steps; saves every 5 steps, 3 kept. The checkpoints written meanwhile
    are suspect; the one before the NaN is named, and still exists."""
    m, sp, de = small()
    data = [batch(k % 20, (k + 7) % 20) for k in range(45)] + [batch(999, 1)]

    class Poison:
        def on_log(self, trainer, logs):
            if logs["step"] == 31:  # after ckpt-30 was written
                table = trainer.model.emb.table
                state = table.state_dict()
                state["ids"] = torch.cat([state["ids"], torch.tensor([999])])
                nan_row = torch.full((1, state["values"].shape[1]), float("nan"))
                state["values"] = torch.cat([state["values"], nan_row])
                for key in ("frequency", "last_step"):
                    state[key] = torch.cat([state[key], torch.tensor([1])])
                table.load_state_dict(state)

    args = TrainingArguments(
        str(tmp_path), max_steps=60, save_every_steps=5, keep_checkpoints=3, log_every_steps=1, progress=False
    )
    t = Trainer(m, args, data, dense_optimizer=de, sparse_optimizer=sp, hooks=[Poison()])
    caplog.set_level(logging.WARNING, "recis.checkpoint")
    with pytest.raises(TrainingError) as e:
        t.train()
    ckpts = tmp_path / "checkpoints"
    msg = str(e.value)
    assert msg.startswith("non-finite loss (nan) at step 46")
    assert f"the last good checkpoint is {ckpts / 'ckpt-30'};" in msg
    assert "the newer ckpt-35, ckpt-40, ckpt-45 hold non-finite values (table 'emb': 1 row(s)" in msg
    assert "e.g. id 999" in msg
    assert sorted(os.listdir(ckpts)) == ["ckpt-30", "ckpt-35", "ckpt-40", "ckpt-45", "latest"]
    for step in (35, 40, 45):
        assert ckpt_module.suspect(str(ckpts / f"ckpt-{step}")), step
    assert not ckpt_module.suspect(str(ckpts / "ckpt-30"))
    assert t.checkpoints.last_good() == str(ckpts / "ckpt-30")
    assert any("ckpt-35 holds non-finite values, marked suspect" in r.getMessage() for r in caplog.records)
    # The last good one loads, and holds no NaN.
    m2, state = fresh_parts()
    assert t.checkpoints.load(str(ckpts / "ckpt-30"), **state) == 30
    assert torch.isfinite(m2.emb.table.state_dict()["values"]).all()


def test_resume_after_a_nan_sets_the_suspect_ones_aside_and_starts_from_the_last_good(tmp_path, capsys):
    """The retry after the probe's failure: resuming from a suspect
    checkpoint would meet its NaN again, so the run resumes from the last
    good one and keeps the suspect ones, renamed, for a look."""
    m, sp, de = small()
    good = [batch(k % 20, (k + 7) % 20) for k in range(12)]
    args = TrainingArguments(str(tmp_path), max_steps=10, save_every_steps=5, log_every_steps=1, progress=False)
    Trainer(m, args, good, dense_optimizer=de, sparse_optimizer=sp).train()
    ckpts = tmp_path / "checkpoints"
    poisoned = str(ckpts / "ckpt-10")
    meta = read_meta(poisoned)
    meta["suspect"] = ["table 'emb': 1 row(s) hold a NaN or an infinity (e.g. id 3)"]
    rewrite_meta(poisoned, meta)
    m_ref, state = fresh_parts()
    assert CheckpointManager(str(ckpts)).load(str(ckpts / "ckpt-5"), **state) == 5
    expected = m_ref.emb.table.state_dict()

    m2, sp2, de2 = small()
    t = Trainer(
        m2,
        TrainingArguments(str(tmp_path), max_steps=5, progress=False),
        good,
        dense_optimizer=de2,
        sparse_optimizer=sp2,
    )
    t._resume()
    out = capsys.readouterr().out
    assert t.global_step == 5
    assert f"skipped the suspect checkpoint {poisoned} (suspect: table 'emb': 1 row(s)" in out
    assert f"set aside as {poisoned}.suspect" in out
    assert sorted(os.listdir(ckpts)) == ["ckpt-10.suspect", "ckpt-5", "latest"]
    assert (ckpts / "latest").read_text() == "ckpt-5"
    got = m2.emb.table.state_dict()
    assert torch.equal(got["ids"], expected["ids"]) and torch.equal(got["values"], expected["values"])

    # With every checkpoint suspect there is nothing good to resume from.
    meta5 = read_meta(str(ckpts / "ckpt-5"))
    meta5["suspect"] = ["dense.safetensors: head.bias holds a NaN or an infinity"]
    rewrite_meta(str(ckpts / "ckpt-5"), meta5)
    m3, sp3, de3 = small()
    t3 = Trainer(m3, TrainingArguments(str(tmp_path), progress=False), good, dense_optimizer=de3, sparse_optimizer=sp3)
    with pytest.raises(CheckpointError) as e:
        t3._resume()
    assert "every checkpoint holds non-finite values (ckpt-5: suspect: dense.safetensors: head.bias" in str(e.value)
    assert sorted(os.listdir(ckpts)) == ["ckpt-10.suspect", "ckpt-5", "latest"]

    # resume_suspect=True loads it anyway.
    m4, sp4, de4 = small()
    args4 = TrainingArguments(str(tmp_path), progress=False, resume_suspect=True)
    t4 = Trainer(m4, args4, good, dense_optimizer=de4, sparse_optimizer=sp4)
    t4._resume()
    assert t4.global_step == 5 and "is suspect" in capsys.readouterr().out


def test_a_non_finite_dense_parameter_marks_the_checkpoint_suspect(tmp_path):
    m, sp, de = trained()
    with torch.no_grad():
        m.head.bias.fill_(float("inf"))
    path = CheckpointManager(str(tmp_path)).save(2, **parts(m, sp, de))
    assert ckpt_module.suspect(path) == ["dense.safetensors: head.bias holds a NaN or an infinity"]


# -- the output_dir lock ---------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint_verify import small, batch
    from recis.framework import Trainer, TrainingArguments, TrainingError

    class Hold:
        def on_log(self, trainer, logs):
            print("holding", flush=True)
            sys.stdin.readline()  # until the parent kills this process

    m, sp, de = small()
    args = TrainingArguments({out!r}, max_steps=1, log_every_steps=1, progress=False)
    hooks = [Hold()] if sys.argv[1] == "hold" else []
    try:
        Trainer(m, args, [batch(1, 2)], dense_optimizer=de, sparse_optimizer=sp, hooks=hooks).train()
    except TrainingError as e:
        print(e, file=sys.stderr)
        sys.exit(3)
    """
)


def child(out, mode, **kw):
    code = CHILD.format(tests=os.path.join(ROOT, "tests"), out=str(out))
    return subprocess.Popen([sys.executable, "-c", code, mode], text=True, **kw)


def test_a_second_trainer_on_a_locked_output_dir_is_refused_with_the_holders_pid(tmp_path):
    refusals = []

    class Second:
        def on_log(self, trainer, logs):
            if logs["step"] != 1:
                return
            m, sp, de = small()
            second = Trainer(m, TrainingArguments(str(tmp_path), max_steps=1), [batch(1)], sparse_optimizer=sp)
            with pytest.raises(TrainingError) as e:
                second.train()
            refusals.append(str(e.value))
            p = child(tmp_path, "try", stderr=subprocess.PIPE)  # another process
            _, err = p.communicate(timeout=120)
            refusals.append((p.returncode, err))

    m, sp, de = small()
    args = TrainingArguments(str(tmp_path), max_steps=2, log_every_steps=1, progress=False)
    Trainer(m, args, [batch(1, 2)] * 2, dense_optimizer=de, sparse_optimizer=sp, hooks=[Second()]).train()
    lock = str(tmp_path / ".lock")
    assert refusals[0].startswith(f"{tmp_path} is in use by another run (pid {os.getpid()} holds {lock})")
    rc, err = refusals[1]
    assert rc == 3 and f"(pid {os.getpid()} holds {lock})" in err, err
    # Released at the end: a later run goes ahead.
    m, sp, de = small()
    Trainer(m, TrainingArguments(str(tmp_path), max_steps=3), [batch(1, 2)] * 3, sparse_optimizer=sp).train()


def test_a_lock_held_by_another_process_refuses_and_a_killed_holder_blocks_nothing(tmp_path):
    p = child(tmp_path, "hold", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "holding"
        m, sp, de = small()
        t = Trainer(m, TrainingArguments(str(tmp_path), max_steps=1, progress=False), [batch(1)], sparse_optimizer=sp)
        with pytest.raises(TrainingError, match=rf"is in use by another run \(pid {p.pid} holds "):
            t.train()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    assert open(tmp_path / ".lock").read().strip() == str(p.pid)  # the stale lock file stays
    t.train()  # and blocks nothing
    assert t.global_step == 1


# -- messages that name the file ---------------------------------------------------


def test_a_truncated_dense_checkpoint_names_the_file(tmp_path):
    path = saved(tmp_path).latest()
    dense = os.path.join(path, "dense.safetensors")
    os.truncate(dense, os.path.getsize(dense) - 3)
    with pytest.raises(CheckpointError, match=rf"{dense}: \d+ bytes where meta.json recorded \d+ \(truncated"):
        ckpt_module.verify_checkpoint(path)
    as_old_checkpoint(path)  # without checksums the header check names it
    with pytest.raises(CheckpointError, match=rf"{dense}: not a valid safetensors file: tensor .* run past the data"):
        ckpt_module.verify_checkpoint(path)


def test_invalid_meta_json_names_the_file_and_the_position(tmp_path):
    path = saved(tmp_path).latest()
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write('{"format": 1 "step": 2}')
    with pytest.raises(CheckpointError, match=rf"{path}/meta.json: not valid JSON \(line 1, column 14: Expecting ','"):
        ckpt_module.verify_checkpoint(path)


@pytest.mark.parametrize("recorded", [True, False])
def test_switching_the_dense_optimizer_names_it(tmp_path, recorded):
    path = saved(tmp_path).latest()
    if not recorded:  # an old checkpoint: told by the options of its groups
        as_old_checkpoint(path)
    m, sp, de = small(torch.optim.Adagrad)
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(str(tmp_path / "checkpoints")).load(path, **parts(m, sp, de))
    msg = str(e.value)
    assert msg.startswith(f"{path}/meta.json: dense_optimizer")
    if recorded:
        assert "was saved by Adam, this run's is Adagrad" in msg
    else:
        assert "saved by another optimizer" in msg and "'betas'" in msg and "'lr_decay'" in msg


def test_a_missing_table_file_names_it(tmp_path):
    path = saved(tmp_path).latest()
    table = os.path.join(path, "table-emb.00000.safetensors")
    os.remove(table)
    with pytest.raises(CheckpointError, match=rf"{table}: missing \(meta.json records its checksum\)"):
        ckpt_module.verify_checkpoint(path)
    as_old_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"{table}: missing \(meta.json lists it for table 'emb'\)"):
        ckpt_module.verify_checkpoint(path)


def test_a_foreign_safetensors_file_names_it(tmp_path):
    path = saved(tmp_path).latest()
    table = os.path.join(path, "table-emb.00000.safetensors")
    save_file({"weight": torch.zeros(3, 3)}, table)  # a file from elsewhere
    with pytest.raises(CheckpointError, match=rf"{table}: \d+ bytes where meta.json recorded|{table}: checksum"):
        ckpt_module.verify_checkpoint(path)
    as_old_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"{table}: does not hold table 'emb' .*lacks \['frequency', 'ids'"):
        ckpt_module.verify_checkpoint(path)
    with open(table, "wb") as f:  # not safetensors at all
        f.write(b"PK\x03\x04 a zip file")
    with pytest.raises(CheckpointError, match=rf"{table}: not a valid safetensors file: the header claims"):
        ckpt_module.verify_checkpoint(path)


def test_ranks_digest_a_checkpoint_between_them_and_one_share_finds_the_flip(tmp_path):
    """Under torchrun each rank digests its share of the files (k of every
    n, by name) and the ranks combine verdicts: each file is digested once
    in all, and the share holding a damaged file finds it."""
    manager = saved(tmp_path)
    path = manager.latest()
    files = sorted(read_meta(path)["checksums"]["files"])
    assert len(files) >= 2
    digested = []
    real = ckpt_module._native.checksum_file
    try:
        ckpt_module._native.checksum_file = lambda f: digested.append(os.path.basename(f)) or real(f)
        for k in range(2):
            ckpt_module.verify_checkpoint(path, share=(k, 2))
    finally:
        ckpt_module._native.checksum_file = real
    assert sorted(digested) == files  # each once, over the two shares
    victim = files[1]  # the second file: share (1, 2)'s
    flip_bit(os.path.join(path, victim), os.path.getsize(os.path.join(path, victim)) - 1)
    ckpt_module.verify_checkpoint(path, share=(0, 2))  # not its file
    with pytest.raises(CheckpointError, match=rf"{victim}: checksum mismatch"):
        ckpt_module.verify_checkpoint(path, share=(1, 2))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt_module.verify_checkpoint(path)  # one process digests every file
