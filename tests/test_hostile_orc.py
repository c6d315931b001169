"""Hostile ORC input: every malformed file ends in ``recis.DataError`` naming
the file, never a signal, an abort, a hang or a ``PanicException``; memory
stays bounded.

The mutation test reads hundreds of mutated files (of ``recis datagen`` and
of pyarrow files in every codec) in a child process that loads only the
extension (no torch, so its address space can be capped), and checks that
the child exits normally with every file either read or refused with a
``DataError``. The Rust side (crafted footers, bombs, type loops) is
``rust/recis-core/tests/hostile_orc.rs``; the fuzz targets are ``fuzz/``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import pytest

import recis
from recis import _native
from recis.datagen import generate
from recis.io import Column, OrcDataset


def test_data_error_is_a_value_error_exported_by_recis():
    assert issubclass(recis.DataError, ValueError)
    assert recis.DataError is _native.DataError
    assert recis.DataError.__module__ == "recis"


def test_a_truncated_file_is_a_data_error_naming_it(tmp_path):
    po.write_table(pa.table({"x": pa.array(range(1000), pa.int64())}), tmp_path / "good.orc")
    data = (tmp_path / "good.orc").read_bytes()
    (tmp_path / "cut.orc").write_bytes(data[: len(data) - 7])
    with pytest.raises(recis.DataError, match=r"cut\.orc"):
        OrcDataset(tmp_path / "cut.orc", 10, ["x"])
    (tmp_path / "empty.orc").write_bytes(b"")
    with pytest.raises(recis.DataError, match=r"empty\.orc"):
        OrcDataset(tmp_path / "empty.orc", 10, ["x"])
    (tmp_path / "text.orc").write_bytes(b"label,id\n1,2\n" * 100)
    with pytest.raises(recis.DataError, match=r"text\.orc: not a readable ORC file: not an ORC file"):
        OrcDataset(tmp_path / "text.orc", 10, ["x"])


def test_a_missing_column_is_a_data_error(tmp_path):
    po.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), tmp_path / "a.orc")
    with pytest.raises(recis.DataError, match=r"a\.orc: column \"y\" not found"):
        OrcDataset(tmp_path, 10, ["y"])


def test_too_many_threads_is_a_value_error_not_a_panic(tmp_path):
    po.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), tmp_path / "a.orc")
    ds = OrcDataset(tmp_path, 10, ["x"], num_threads=100_000)
    with pytest.raises(ValueError, match=r"num_threads must be in 1\.\.=256, got 100000"):
        next(iter(ds))


@pytest.mark.parametrize("compression", ["uncompressed", "zstd"])
def test_list_elements_are_capped_per_batch_on_both_decoders(tmp_path, compression):
    # A row of 50 elements among rows of 2, as int64 lists (our decoder) and
    # string lists hashed at read time (orc-rust's).
    lists = [[1, 2]] * 30 + [list(range(50))] + [[3, 4]] * 30
    table = pa.table(
        {
            "ints": pa.array(lists, pa.list_(pa.int64())),
            "tags": pa.array([[str(v) for v in row] for row in lists], pa.list_(pa.string())),
        }
    )
    po.write_table(table, tmp_path / "lists.orc", compression=compression)
    for col in [Column("ints"), Column("tags", hash=True)]:
        ok = OrcDataset(tmp_path, 8, [col])
        assert sum(b[col.name].values.numel() for b in ok) == sum(len(r) for r in lists)
        capped = OrcDataset(tmp_path, 8, [col], max_list_elements=40)
        with pytest.raises(recis.DataError, match=rf"lists\.orc.*{col.name}.*max_list_elements"):
            for _ in capped:
                pass


def test_limits_are_checked(tmp_path):
    po.write_table(pa.table({"x": pa.array(range(100), pa.int64())}), tmp_path / "a.orc")
    with pytest.raises(recis.DataError, match=r"a\.orc.*stripe 0 claims 100 rows, more than the limit of 99"):
        OrcDataset(tmp_path, 10, ["x"], max_stripe_rows=99)
    with pytest.raises(ValueError, match=r"must be ints in \[1, 2\*\*63\)"):
        OrcDataset(tmp_path, 10, ["x"], max_list_elements=0)


# -- the mutation test ---------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import importlib.util, json, resource, sys
    so, cap, listing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    spec = importlib.util.spec_from_file_location("recis._native", so)
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    for path, cols in json.load(open(listing)):
        print("start", path, flush=True)
        try:
            src = native.OrcSource([path], [tuple(c) for c in cols])
            r = src.reader(False, 0, 0, 0, 1, 0, 0, 64, False, 2, 2)
            rows = 0
            while (b := r.next_batch()) is not None:
                rows += b[1]
            print("ok", rows, flush=True)
        except native.DataError as e:
            print("error", str(e).replace("\\n", " ")[:300], flush=True)
        except BaseException as e:
            print("bad", type(e).__name__, str(e).replace("\\n", " ")[:300], flush=True)
    # VmHWM: this process's own peak (ru_maxrss would count the parent's
    # memory at fork).
    hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    print("peak", hwm[0] if hwm else -1, flush=True)
    """
)


def _bases(tmp_path) -> list[tuple[str, list]]:
    """Files to mutate, with the columns to read: a `recis datagen` file
    (zstd, Criteo layout: int label, float dense, list<int64> fields) and
    pyarrow files with strings, booleans, nulls and lists in each codec."""
    out = []
    for compression in ["zstd", "uncompressed"]:
        d = tmp_path / f"datagen-{compression}"
        [path] = generate(str(d), rows=300, files=1, vocab=1000, seed=1, compression=compression)
        cols = [["label", False, 0], ["I1", False, 0], ["I2", False, 0], ["C1", False, 0], ["C2", False, 0]]
        out.append((path, cols))
    rng = np.random.default_rng(0)
    n = 400
    table = pa.table(
        {
            "i": pa.array(rng.integers(-(2**40), 2**40, n)),
            "f": pa.array(np.where(rng.random(n) < 0.1, None, rng.random(n))),
            "s": pa.array([f"v{int(x)}" if x % 5 else None for x in rng.integers(0, 50, n)]),
            "b": pa.array(rng.random(n) < 0.5),
            "l": pa.array([list(range(int(k))) for k in rng.integers(0, 4, n)], pa.list_(pa.int64())),
            "t": pa.array([[f"t{j}" for j in range(int(k))] for k in rng.integers(0, 3, n)], pa.list_(pa.string())),
        }
    )
    cols = [["i", False, 0], ["f", False, 0], ["s", True, 0], ["b", False, 0], ["l", False, 0], ["t", True, 0]]
    for compression in ["zstd", "zlib", "snappy", "lz4", "uncompressed"]:
        path = tmp_path / f"mixed-{compression}.orc"
        po.write_table(table, path, compression=compression, stripe_size=8192)
        out.append((str(path), cols))
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flip a few bits anywhere
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # bytes of the tail (postscript, footer, metadata)
        for _ in range(rng.randint(1, 4)):
            i = len(b) - 1 - rng.randrange(min(len(b), 400))
            b[i] = rng.randrange(256)
    elif kind == 2:  # truncate
        del b[rng.randrange(1, len(b)) :]
    elif kind == 3:  # overwrite a range with random or extreme bytes
        i = rng.randrange(len(b))
        fill = rng.choice([0x00, 0xFF, None])
        for j in range(i, min(len(b), i + rng.randint(1, 64))):
            b[j] = rng.randrange(256) if fill is None else fill
    elif kind == 4:  # duplicate a range into another place
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        k = rng.randint(1, 256)
        b[j : j + k] = b[i : i + k]
    else:  # varint-sized edits where the lengths live: the last 64 bytes
        i = len(b) - 2 - rng.randrange(min(len(b) - 1, 64))
        b[i] = rng.choice([0x7F, 0x80, 0xFF, 0x01, 0x00])
    return bytes(b)


def test_mutated_files_never_crash_hang_or_panic(tmp_path):
    rng = random.Random(20261202)
    listing = []
    per_base = int(os.environ.get("RECIS_MUTATIONS_PER_FILE", "60"))
    for path, cols in _bases(tmp_path):
        data = open(path, "rb").read()
        for k in range(per_base):
            p = tmp_path / "mut" / f"{os.path.basename(path)}.{k}.orc"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(_mutate(data, rng))
            listing.append((str(p), cols))
        listing.append((path, cols))  # the base itself reads
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    (tmp_path / "child.py").write_text(CHILD)
    cap = 8 << 30
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), _native.__file__, str(cap), str(tmp_path / "listing.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.splitlines()
    peak_kib = int(lines.pop().split()[1]) if lines and lines[-1].startswith("peak ") else None
    starts = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("start ")]
    results = [ln for ln in lines if not ln.startswith("start ")]
    last = starts[-1] if starts else "?"
    assert proc.returncode == 0, f"child died ({proc.returncode}) on {last}: {proc.stderr[-2000:]}"
    assert len(starts) == len(listing) and len(results) == len(listing)
    bad = [(s, r) for s, r in zip(starts, results, strict=True) if r.startswith("bad")]
    assert not bad, bad[:5]
    assert "PanicException" not in proc.stderr
    outcomes = {"ok": 0, "error": 0}
    for (path, _), r in zip(listing, results, strict=True):
        outcomes[r.split(" ", 1)[0]] += 1
        if r.startswith("error"):
            assert os.path.basename(path) in r, r  # names the file
    assert all(r.startswith("ok") for (p, _), r in zip(listing, results, strict=True) if "/mut/" not in p)
    assert outcomes["error"] > len(listing) // 3, outcomes  # the mutations mostly bite
    assert peak_kib is not None and 0 < peak_kib < 2 << 20, f"the child peaked at {peak_kib} KiB"
    print(f"\nmutations: {len(listing)} files, {outcomes}, peak RSS {peak_kib / 1024:.0f} MiB")
