"""OrcDataset's row shuffle (``shuffle_buffer``): permutations, seeding,
mixing across files, exact resume mid-window, columns kept with their row."""

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import pytest
import torch

from recis import _native
from recis.io import Column, OrcDataset
from recis.io.dataset import window_bounds, window_permutation

FILES, ROWS = 6, 500  # one stripe a file, as `recis convert` wrote before --rows-per-stripe
N = FILES * ROWS
COLUMNS = ["id", "label", "f", "s", "li", "ls", Column("h", hash=True)]


def row_values(i):
    """Every column of row ``i`` is a function of ``i``."""
    return {
        "label": i % 2,
        "f": i * 0.5,
        "s": f"r{i}" * (i % 3),  # "" every third row
        "li": list(range(i, i + i % 4)),
        "ls": [f"t{i}.{j}" for j in range(i % 3)],
        "h": f"k{i}",
    }


def table(ids):
    vals = [row_values(i) for i in ids]
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "label": pa.array([v["label"] for v in vals], pa.int64()),
            "f": pa.array([v["f"] for v in vals], pa.float64()),
            "s": pa.array([v["s"] for v in vals], pa.string()),
            "li": pa.array([v["li"] for v in vals], pa.list_(pa.int64())),
            "ls": pa.array([v["ls"] for v in vals], pa.list_(pa.string())),
            "h": pa.array([v["h"] for v in vals], pa.string()),
        }
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shuffle")
    for k in range(FILES):
        po.write_table(table(list(range(k * ROWS, (k + 1) * ROWS))), d / f"part-{k}.orc", compression="zstd")
    return d


@pytest.fixture(scope="module")
def hashes(data):
    """Row id -> its hashed ``h``, read without a shuffle."""
    out = {}
    for b in OrcDataset(data, 1000, ["id", Column("h", hash=True)]):
        out.update(zip(b["id"].tolist(), b["h"].tolist(), strict=True))
    return out


def ids_of(ds):
    return [b["id"].tolist() for b in ds]


def strings(col):
    data = col.bytes.tobytes()
    return [data[col.str_offsets[i] : col.str_offsets[i + 1]].decode() for i in range(col.num_strings)]


def check_rows(batch, hashes):
    """Every column of every row of ``batch`` matches its row id."""
    ids = batch["id"].tolist()
    s = strings(batch["s"])
    li_o, li_v = batch["li"].offsets.tolist(), batch["li"].values.tolist()
    ls_all, ls_o = strings(batch["ls"]), batch["ls"].offsets.tolist()
    for r, i in enumerate(ids):
        want = row_values(i)
        assert batch["label"][r].item() == want["label"]
        assert batch["f"][r].item() == want["f"]
        assert s[r] == want["s"]
        assert li_v[li_o[r] : li_o[r + 1]] == want["li"]
        assert ls_all[ls_o[r] : ls_o[r + 1]] == want["ls"]
        assert batch["h"][r].item() == hashes[i]


def test_the_input_has_one_stripe_a_file(data):
    assert _native.OrcSource([str(data)], [("id", False, 0)]).plan_rows(False, 0, 0, 0, 1) == [ROWS] * FILES


def test_every_epoch_is_a_permutation_with_every_column_kept_with_its_row(data, hashes):
    ds = OrcDataset(data, 64, COLUMNS, shuffle=True, seed=7, shuffle_buffer=1000)
    epochs = []
    for _ in range(2):
        batches = list(ds)
        assert [len(b["id"]) for b in batches] == [64] * (N // 64) + [N % 64]
        assert len(batches) == len(ds)
        for b in batches:
            check_rows(b, hashes)
        ids = [i for b in batches for i in b["id"].tolist()]
        assert sorted(ids) == list(range(N))
        epochs.append(ids)
    assert epochs[0] != epochs[1]


def test_drop_remainder_keeps_batches_whole(data):
    ds = OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=1000, drop_remainder=True)
    sizes = [len(b) for b in ids_of(ds)]
    assert sizes == [64] * (N // 64) and len(ds) == N // 64


def test_seeded(data):
    a = ids_of(OrcDataset(data, 100, ["id"], shuffle=True, seed=1, shuffle_buffer=1000))
    assert ids_of(OrcDataset(data, 100, ["id"], shuffle=True, seed=1, shuffle_buffer=1000)) == a
    assert ids_of(OrcDataset(data, 100, ["id"], shuffle=True, seed=2, shuffle_buffer=1000)) != a


def test_rows_mix_across_files(data):
    def files_in_first_batch(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = next(iter(OrcDataset(data, 100, ["id"], shuffle=True, seed=3, **kw)))
        return {i // ROWS for i in first["id"].tolist()}

    # Stripes only (the behaviour of issue #15): a batch is a slice of one file.
    assert len(files_in_first_batch(shuffle_buffer=0)) == 1
    assert len(files_in_first_batch(shuffle_buffer=1000)) == 2  # windows of two files
    assert len(files_in_first_batch()) > 3  # the default buffer holds the whole (small) data: all six


def test_windows_and_permutation():
    assert window_bounds([500] * 6, 1000) == [0, 2, 4, 6]
    assert window_bounds([500] * 5, 1000) == [0, 2, 4, 5]  # the last window holds fewer
    assert window_bounds([300, 900, 10, 10], 1000) == [0, 2, 4]
    assert window_bounds([500] * 3, 1 << 20) == [0, 3]
    assert window_bounds([], 10) == [0]
    p = window_permutation(1000, 5, 1, 0, 2)
    assert sorted(p.tolist()) == list(range(1000))
    assert np.array_equal(p, window_permutation(1000, 5, 1, 0, 2))
    for other in ((6, 1, 0, 2), (5, 2, 0, 2), (5, 1, 1, 2), (5, 1, 0, 3)):
        assert not np.array_equal(p, window_permutation(1000, *other)), other
    # Pinned: a checkpoint's cursor points into this order, so it must not
    # change between versions.
    assert window_permutation(10, 0, 0, 0, 0).tolist() == PINNED


PINNED = [3, 5, 2, 8, 9, 7, 4, 1, 6, 0]


@pytest.mark.parametrize(
    "batch_size, buffer, worker_num, drop_remainder",
    [(64, 1000, 1, False), (64, 1000, 2, True), (700, 1000, 1, False), (37, 400, 1, False), (100, 1 << 20, 1, False)],
)
def test_resume_anywhere_equals_one_uninterrupted_read(data, batch_size, buffer, worker_num, drop_remainder):
    """Cut after every k-th batch, over two epochs: mid-window, at a batch
    that spans two windows, at a window's end; each resumed read hands out
    exactly the rest of the uninterrupted one."""
    for w in range(worker_num):
        kw = dict(
            shuffle=True,
            seed=11,
            shuffle_buffer=buffer,
            worker_idx=w,
            worker_num=worker_num,
            drop_remainder=drop_remainder,
        )
        whole_ds = OrcDataset(data, batch_size, ["id", "ls"], **kw)
        whole = [ids_of(whole_ds), ids_of(whole_ds)]
        n = len(whole[0])
        for epoch in range(2):
            for cut in sorted({1, 2, n // 3, n // 2, n - 1}):
                ds = OrcDataset(data, batch_size, ["id", "ls"], **kw)
                if epoch:
                    list(ds)
                it = iter(ds)
                head = [next(it)["id"].tolist() for _ in range(cut)]
                state = json.loads(json.dumps(ds.state_dict()))
                it.close()
                resumed = OrcDataset(data, batch_size, ["id", "ls"], **kw)
                resumed.load_state_dict(state)
                rest = ids_of(resumed)
                assert head + rest == whole[epoch], (epoch, cut, state)
                if epoch == 0 and cut == 1:
                    assert ids_of(resumed) == whole[1]  # and the next epoch goes on
    shares = [
        sorted(i for b in ids_of(OrcDataset(data, 50, ["id"], shuffle=True, worker_idx=w, worker_num=3)) for i in b)
        for w in range(3)
    ]
    assert sorted(sum(shares, [])) == list(range(N))  # each worker shuffles its own share


def test_resume_mid_window_with_every_column_kept(data, hashes):
    kw = dict(shuffle=True, seed=4, shuffle_buffer=1000)
    whole = list(OrcDataset(data, 64, COLUMNS, **kw))
    ds = OrcDataset(data, 64, COLUMNS, **kw)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    it.close()
    assert state["unit"] == 0 and state["row"] == 5 * 64 and state["shuffle_buffer"] == 1000
    resumed = OrcDataset(data, 64, COLUMNS, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(whole) - 5
    for got, want in zip(rest, whole[5:], strict=True):
        assert got["id"].tolist() == want["id"].tolist()
        assert torch.equal(got["li"].values, want["li"].values)
        assert got["ls"].bytes.tobytes() == want["ls"].bytes.tobytes()
        check_rows(got, hashes)


def test_a_changed_or_missing_shuffle_buffer_is_refused(data):
    ds = OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=1000)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    it.close()
    with pytest.raises(ValueError, match="saved with shuffle_buffer=1000 but this dataset has shuffle_buffer=2000"):
        OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=2000).load_state_dict(state)
    # A state saved before shuffle_buffer existed: its cursor is a stripe's row.
    old = dict(state, unit=1, row=100, seed=2)
    old.pop("shuffle_buffer")
    with pytest.raises(
        ValueError, match=r"no shuffle_buffer: it was saved before rows were shuffled.*shuffle_buffer=0"
    ):
        OrcDataset(data, 64, ["id"], shuffle=True, seed=2).load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        units = OrcDataset(data, 64, ["id"], shuffle=True, seed=2, shuffle_buffer=0)
        whole = [i for b in ids_of(units) for i in b]
        resumed = OrcDataset(data, 64, ["id"], shuffle=True, seed=2, shuffle_buffer=0)
    resumed.load_state_dict(old)
    assert [i for b in ids_of(resumed) for i in b] == whole[ROWS + 100 :]
    # Without a shuffle the buffer does not matter, and old states resume.
    plain = OrcDataset(data, 64, ["id"], shuffle_buffer=5)
    assert plain.state_dict()["shuffle_buffer"] == 0
    OrcDataset(data, 64, ["id"]).load_state_dict({k: v for k, v in plain.state_dict().items() if k != "shuffle_buffer"})
    # A cursor that is not at a window's start.
    bad = dict(state, unit=1)
    with pytest.raises(ValueError, match=r"cursor \(window at unit 1, row 64\) is not in the plan's windows"):
        OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=1000).load_state_dict(bad)


def test_a_shuffle_that_cannot_mix_rows_warns(data, tmp_path):
    with pytest.warns(UserWarning, match=r"shuffle_buffer=64 <= batch_size=64 barely mixes rows") as got:
        OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=64)
    assert len(got) == 1
    with pytest.warns(UserWarning, match="shuffle_buffer=0 shuffles stripes only: the rows of a stripe stay"):
        OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=0)
    po.write_table(table(list(range(100))), tmp_path / "one.orc")
    with pytest.warns(UserWarning, match="shuffles nothing: shuffle_buffer=0 shuffles stripes only, and there is one"):
        OrcDataset(tmp_path / "one.orc", 64, ["id"], shuffle=True, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OrcDataset(data, 64, ["id"], shuffle=True)
        OrcDataset(data, 64, ["id"], shuffle_buffer=0)  # no shuffle asked for
    with pytest.raises(ValueError, match="shuffle_buffer must be an int >= 0"):
        OrcDataset(data, 64, ["id"], shuffle=True, shuffle_buffer=-1)


def test_a_window_of_many_stripes_of_several_files(tmp_path, hashes):
    """Files of many stripes: a window holds stripes of several files, and
    a stripe may end inside a reader batch."""
    for k in range(3):
        ids = list(range(k * 1000, (k + 1) * 1000))
        po.write_table(table(ids), tmp_path / f"p{k}.orc", compression="uncompressed", stripe_size=1, batch_size=70)
    rows = _native.OrcSource([str(tmp_path)], [("id", False, 0)]).plan_rows(True, 0, 0, 0, 1)
    assert len(rows) > 40
    ds = OrcDataset(tmp_path, 128, COLUMNS, shuffle=True, shuffle_buffer=500)
    batches = list(ds)
    ids = [i for b in batches for i in b["id"].tolist()]
    assert sorted(ids) == list(range(3000))
    for b in batches:
        check_rows(b, hashes)  # the same ids as `data`'s, so the same hashes
