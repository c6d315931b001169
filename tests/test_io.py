"""OrcDataset against pyarrow.orc, exact resume, sharding and bad files."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.orc as po
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis import RaggedTensor, _native
from recis.features import StringColumn
from recis.io import Column, OrcDataset

COMPRESSIONS = ["uncompressed", "zlib", "snappy", "lz4", "zstd"]
# pyarrow's writer with stripe_size=1 ends a stripe after every write batch,
# but only for uncompressed files; those give the dataset many stripes.
FILES = COMPRESSIONS + ["uncompressed"]


def make_table(rng, n, start=0):
    """Every column kind, with nulls and empty lists."""

    def nulls(values, p=0.1):
        return [None if rng.random() < p else v for v in values]

    ints = rng.integers(-(2**40), 2**40, n).tolist()
    return pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "i8": pa.array(nulls(rng.integers(-100, 100, n).tolist()), pa.int8()),
            "i32": pa.array(nulls(rng.integers(-(2**31), 2**31 - 1, n).tolist()), pa.int32()),
            "i64": pa.array(nulls(ints), pa.int64()),
            "flag": pa.array(nulls([bool(x) for x in rng.integers(0, 2, n)]), pa.bool_()),
            "f32": pa.array(nulls(rng.random(n).tolist()), pa.float32()),
            "f64": pa.array(nulls(rng.random(n).tolist()), pa.float64()),
            "s": pa.array(nulls([f"v{x}" * int(x % 4) for x in rng.integers(0, 1000, n)]), pa.string()),
            "li": pa.array(
                nulls([rng.integers(0, 1 << 50, rng.integers(0, 4)).tolist() for _ in range(n)]), pa.list_(pa.int64())
            ),
            "ls": pa.array(
                nulls([[f"t{x}" for x in rng.integers(0, 50, rng.integers(0, 3))] for _ in range(n)]),
                pa.list_(pa.string()),
            ),
            "lf": pa.array(nulls([rng.random(rng.integers(0, 3)).tolist() for _ in range(n)]), pa.list_(pa.float64())),
        }
    )


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Six files (every compression, uncompressed ones cut into many stripes),
    plus a zero-row file."""
    d = tmp_path_factory.mktemp("orc")
    rng = np.random.default_rng(0)
    start = 0
    for k, comp in enumerate(FILES):
        n = 700 + 150 * k
        po.write_table(make_table(rng, n, start), d / f"part-{k}.orc", compression=comp, stripe_size=1, batch_size=50)
        start += n
    po.write_table(make_table(rng, 0), d / "part-9-empty.orc")
    return d


def pyarrow_rows(d):
    files = sorted(p for p in os.listdir(d) if p.endswith(".orc"))
    return pa.concat_tables([po.read_table(d / f) for f in files])


def fill(values, kind):
    """pyarrow values with RecIS's null fills."""
    fills = {"int": 0, "float": float("nan"), "str": ""}
    return [fills[kind] if v is None else v for v in values]


def concat(batches, name):
    return [b[name] for b in batches]


def test_every_value_equals_pyarrow(dataset_dir):
    files = sorted(dataset_dir.glob("part-*.orc"))
    compressions = {po.ORCFile(f).compression.lower() for f in files if po.ORCFile(f).nrows}
    assert compressions == set(COMPRESSIONS)
    stripes = _native.OrcSource([str(dataset_dir)], [("id", False, 0)]).plan_rows(False, 0, 0, 0, 1)
    assert len(stripes) >= 20  # many stripes: cursors cross stripe boundaries
    ds = OrcDataset(
        dataset_dir,
        batch_size=333,
        columns=["id", "i8", "i32", "i64", "flag", "f32", "f64", "s", "li", "ls", "lf"],
    )
    batches = list(ds)
    t = pyarrow_rows(dataset_dir)
    assert sum(b["id"].numel() for b in batches) == t.num_rows
    for name, kind in [("id", "int"), ("i8", "int"), ("i32", "int"), ("i64", "int"), ("flag", "int")]:
        got = torch.cat(concat(batches, name)).tolist()
        assert got == [int(v) for v in fill(t[name].to_pylist(), kind)], name
    for name in ("f32", "f64"):
        got = torch.cat(concat(batches, name)).numpy()
        expect = np.array(fill(t[name].to_pylist(), "float"), dtype=got.dtype)
        np.testing.assert_array_equal(got, expect)
    strings = []
    for b in batches:
        col: StringColumn = b["s"]
        data = col.bytes.tobytes()
        strings += [data[col.str_offsets[i] : col.str_offsets[i + 1]].decode() for i in range(col.num_strings)]
    assert strings == fill(t["s"].to_pylist(), "str")
    for name in ("li", "lf"):
        rows = []
        for b in batches:
            rt: RaggedTensor = b[name]
            o, v = rt.offsets.tolist(), rt.values.tolist()
            rows += [v[o[i] : o[i + 1]] for i in range(len(o) - 1)]
        assert rows == [r or [] for r in t[name].to_pylist()], name
    ls_rows = []
    for b in batches:
        col = b["ls"]
        data = col.bytes.tobytes()
        strs = [data[col.str_offsets[i] : col.str_offsets[i + 1]].decode() for i in range(col.num_strings)]
        ls_rows += [strs[col.offsets[i] : col.offsets[i + 1]] for i in range(col.batch_size)]
    assert ls_rows == [r or [] for r in t["ls"].to_pylist()]


INT_SHAPES = {
    # Shapes that make the ORC writer choose each RLE v2 run kind.
    "repeats": lambda rng, n: np.repeat(rng.integers(-(2**62), 2**62, n // 7 + 1), 7)[:n],
    "arithmetic": lambda rng, n: rng.integers(-(2**40), 2**40) + np.arange(n) * int(rng.integers(-1000, 1000)),
    "sorted": lambda rng, n: np.sort(rng.integers(0, 2**20, n)),
    "outliers": lambda rng, n: np.where(rng.random(n) < 0.03, rng.integers(2**40, 2**50, n), rng.integers(0, 200, n)),
    "wide": lambda rng, n: rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
    "small": lambda rng, n: rng.integers(-3, 3, n),
}


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(sorted(INT_SHAPES)),
    dtype=st.sampled_from(["int16", "int32", "int64"]),
    compression=st.sampled_from(["uncompressed", "zstd", "snappy"]),
    null_p=st.sampled_from([0.0, 0.2]),
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
)
def test_integer_encodings_equal_pyarrow(tmp_path_factory, shape, dtype, compression, null_p, n, seed):
    """Every RLE v2 run kind (repeat, direct, patched base, delta) through
    RecIS's own decoder, plain and in lists with null rows and elements."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    values = np.clip(INT_SHAPES[shape](rng, n), info.min, info.max).astype(dtype).tolist()
    nulls = rng.random(n) < null_p
    plain = [None if z else v for v, z in zip(values, nulls, strict=True)]
    lengths = rng.integers(0, 5, n)
    lists, at = [], 0
    for k, z in zip(lengths, nulls, strict=True):
        row = [None if rng.random() < null_p else values[(at + j) % n] for j in range(k)]
        lists.append(None if z else row)
        at += k
    d = tmp_path_factory.mktemp("ints")
    table = pa.table({"x": pa.array(plain, type=getattr(pa, dtype)()), "l": pa.array(lists, pa.list_(pa.int64()))})
    po.write_table(table, d / "t.orc", compression=compression)
    batches = list(OrcDataset(d / "t.orc", 1024, ["x", "l"]))
    assert torch.cat([b["x"] for b in batches]).tolist() == [0 if v is None else v for v in plain]
    got = []
    for b in batches:
        o, v = b["l"].offsets.tolist(), b["l"].values.tolist()
        got += [v[o[i] : o[i + 1]] for i in range(len(o) - 1)]
    assert got == [[0 if e is None else e for e in r] if r is not None else [] for r in lists]


def test_strings_hashed_at_read_time_match_fingerprint64(dataset_dir):
    ds = OrcDataset(dataset_dir, 500, [Column("s", hash=True), Column("ls", hash=True, bucket=1000)])
    batches = list(ds)
    t = pyarrow_rows(dataset_dir)
    signed = lambda u: u - 2**64 if u >= 2**63 else u  # noqa: E731
    expect = [signed(_native.fingerprint64(s.encode())) for s in fill(t["s"].to_pylist(), "str")]
    assert torch.cat(concat(batches, "s")).tolist() == expect
    got_ls = torch.cat([b["ls"].values for b in batches]).tolist()
    expect_ls = [_native.fingerprint64(x.encode()) % 1000 for r in t["ls"].to_pylist() for x in (r or [])]
    assert got_ls == expect_ls


def read_ids(ds, limit=None):
    out = []
    for k, b in enumerate(ds):
        out.append(b["id"].tolist())
        if limit is not None and k + 1 >= limit:
            break
    return out


@settings(max_examples=15, deadline=None)
@given(
    worker_num=st.integers(1, 3),
    shuffle=st.booleans(),
    batch_size=st.sampled_from([1, 7, 256, 1000]),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4),
)
def test_resume_after_restarts_equals_one_uninterrupted_read(dataset_dir, worker_num, shuffle, batch_size, cuts):
    for w in range(worker_num):
        kw = dict(batch_size=batch_size, columns=["id"], shuffle=shuffle, seed=5, worker_idx=w, worker_num=worker_num)
        whole = [i for b in read_ids(OrcDataset(dataset_dir, **kw)) for i in b]
        seen, state = [], None
        for cut in cuts:
            ds = OrcDataset(dataset_dir, **kw)
            if state is not None:
                ds.load_state_dict(json.loads(json.dumps(state)))
            it = iter(ds)
            for _ in range(cut):
                b = next(it, None)
                if b is None:
                    break
                seen += b["id"].tolist()
            state = ds.state_dict()
            it.close()
            if state["epoch"] == 1:
                break
        ds = OrcDataset(dataset_dir, **kw)
        ds.load_state_dict(state)
        if state["epoch"] == 0:
            seen += [i for b in read_ids(ds) for i in b]
        assert seen == whole


def test_worker_shards_are_disjoint_and_cover_the_data(dataset_dir):
    total = pyarrow_rows(dataset_dir).num_rows
    shards = [
        [i for b in read_ids(OrcDataset(dataset_dir, 128, ["id"], shuffle=True, worker_idx=w, worker_num=4)) for i in b]
        for w in range(4)
    ]
    all_ids = [i for s in shards for i in s]
    assert sorted(all_ids) == list(range(total))


def test_shuffle_changes_order_per_epoch_and_is_seeded(dataset_dir):
    ds = OrcDataset(dataset_dir, 100, ["id"], shuffle=True, seed=1)
    e0, e1 = read_ids(ds), read_ids(ds)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    again = OrcDataset(dataset_dir, 100, ["id"], shuffle=True, seed=1)
    assert read_ids(again) == e0


def test_drop_remainder(dataset_dir):
    total = pyarrow_rows(dataset_dir).num_rows
    sizes = [len(b) for b in read_ids(OrcDataset(dataset_dir, 1000, ["id"], drop_remainder=True))]
    assert set(sizes) == {1000} and len(sizes) == total // 1000


def test_changing_worker_num_on_restore_is_refused(dataset_dir):
    ds = OrcDataset(dataset_dir, 10, ["id"], worker_idx=0, worker_num=2)
    state = ds.state_dict()
    with pytest.raises(ValueError, match="worker_num=2 but this dataset has worker_num=3"):
        OrcDataset(dataset_dir, 10, ["id"], worker_idx=0, worker_num=3).load_state_dict(state)


def test_works_with_a_dataloader(dataset_dir):
    loader = torch.utils.data.DataLoader(OrcDataset(dataset_dir, 500, ["id", "li"]), batch_size=None)
    ids = [i for b in loader for i in b["id"].tolist()]
    assert ids == list(range(pyarrow_rows(dataset_dir).num_rows))


# -- bad input --------------------------------------------------------------------


def test_missing_column_names_file_and_column(dataset_dir):
    with pytest.raises(ValueError, match=r"part-0\.orc: column \"nope\" not found"):
        OrcDataset(dataset_dir, 10, ["id", "nope"])


def test_hashing_a_non_string_column_is_refused(dataset_dir):
    with pytest.raises(ValueError, match=r"column \"i64\" is int, but hashing was asked for"):
        OrcDataset(dataset_dir, 10, [Column("i64", hash=True)])


def test_type_mismatch_across_files(tmp_path):
    po.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), tmp_path / "a.orc")
    po.write_table(pa.table({"x": pa.array(["1"], pa.string())}), tmp_path / "b.orc")
    with pytest.raises(ValueError, match=r"b\.orc: column \"x\" is string but int in .*a\.orc"):
        OrcDataset(tmp_path, 10, ["x"])


def test_empty_directory_and_unreadable_path(tmp_path):
    with pytest.raises(ValueError, match="holds no .orc files"):
        OrcDataset(tmp_path, 10, ["x"])
    with pytest.raises(ValueError, match="cannot read"):
        OrcDataset(tmp_path / "missing.orc", 10, ["x"])


def test_truncated_file_names_the_file(tmp_path):
    po.write_table(pa.table({"x": pa.array(range(1000), pa.int64())}), tmp_path / "good.orc")
    data = (tmp_path / "good.orc").read_bytes()
    (tmp_path / "cut.orc").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.orc"):
        OrcDataset(tmp_path / "cut.orc", 10, ["x"])


@pytest.mark.parametrize("compression", ["zlib", "uncompressed"])
def test_corrupt_stripe_stops_cleanly_with_the_file_named(tmp_path, compression):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        table = pa.table({"x": pa.array(rng.integers(0, 2**60, 20000)), "l": pa.array([[1, 2]] * 20000)})
        po.write_table(table, tmp_path / f"{name}.orc", compression=compression)
    raw = bytearray((tmp_path / "b.orc").read_bytes())
    for i in range(10, len(raw) // 2):  # scribble over the data, keep the footer
        raw[i] = (raw[i] * 7 + 13) % 256
    (tmp_path / "b.orc").write_bytes(bytes(raw))
    ds = OrcDataset(tmp_path, 1000, ["x", "l"], num_threads=3, prefetch=8)
    got = 0
    with pytest.raises(ValueError, match=r"b\.orc"):
        for b in ds:
            got += b["x"].numel()
    assert got >= 20000  # everything of the good file came first


def test_duplicate_columns_are_refused(dataset_dir):
    with pytest.raises(ValueError, match="requested twice"):
        OrcDataset(dataset_dir, 10, ["id", "id"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_pin_memory_without_cuda_is_refused_clearly(dataset_dir):
    with pytest.raises(ValueError, match="pin_memory=True needs a CUDA device"):
        OrcDataset(dataset_dir, 10, ["id"], pin_memory=True)


@pytest.fixture(scope="module")
def inf_dir(tmp_path_factory):
    """Three files of 50-row stripes (so that a shuffled plan's stripes
    cannot be told apart by their row counts): +inf in part-1's f32 at row
    123, -inf in part-2's list column at row 7; nulls and a stored NaN."""
    d = tmp_path_factory.mktemp("inf")
    for k in range(3):
        n = 300
        f32 = [float(i) for i in range(n)]
        f32[5] = None
        f32[6] = float("nan")
        lf = [[float(i), 0.5] for i in range(n)]
        if k == 1:
            f32[123] = float("inf")
        if k == 2:
            lf[7] = [1.0, float("-inf")]
        table = pa.table(
            {
                "id": pa.array(range(k * n, (k + 1) * n), pa.int64()),
                "f32": pa.array(f32, pa.float32()),
                "lf": pa.array(lf, pa.list_(pa.float64())),
            }
        )
        po.write_table(table, d / f"part-{k}.orc", compression="uncompressed", stripe_size=1, batch_size=50)
    return d


def read_errors(d, columns, **kw):
    """The errors of reading ``d`` by each of two workers."""
    errors = []
    for w in (0, 1):
        try:
            list(OrcDataset(str(d), 64, columns, worker_idx=w, worker_num=2, **kw))
        except ValueError as e:
            errors.append(str(e))
    return errors


@pytest.mark.parametrize("shuffle", [False, True])
def test_inf_in_a_float_column_is_an_error_naming_file_column_and_row(inf_dir, shuffle):
    errors = read_errors(inf_dir, ["id", "f32"], shuffle=shuffle, seed=3)
    assert len(errors) == 1, errors  # one worker reads that stripe
    assert f"{inf_dir / 'part-1.orc'}, row 123: column 'f32': inf is not a finite number" in errors[0], errors
    errors = read_errors(inf_dir, ["id", "lf"], shuffle=shuffle, seed=3)
    assert len(errors) == 1, errors
    assert f"{inf_dir / 'part-2.orc'}, row 7: column 'lf': -inf is not a finite number" in errors[0], errors


def test_non_finite_clamp_and_zero_replace_inf_and_keep_nan_as_null(inf_dir):
    for how, want in (("clamp", torch.finfo(torch.float32).max), ("zero", 0.0)):
        batches = list(OrcDataset(str(inf_dir / "part-1.orc"), 1000, ["f32", "lf"], non_finite=how))
        f32 = batches[0]["f32"]
        assert f32[123].item() == want
        assert torch.isnan(f32[5]) and torch.isnan(f32[6])  # a null and a stored NaN read alike
        assert torch.isfinite(f32[~torch.isnan(f32)]).all()
        big = torch.finfo(torch.float64).max
        lf = list(OrcDataset(str(inf_dir / "part-2.orc"), 1000, ["lf"], non_finite=how))[0]["lf"]
        assert lf.values[15].item() == (-big if how == "clamp" else 0.0)
    with pytest.raises(ValueError, match=r"non_finite must be one of \['error', 'clamp', 'zero'\], got 'keep'"):
        OrcDataset(str(inf_dir), 64, ["f32"], non_finite="keep")
