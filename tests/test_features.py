"""Feature ops against plain Python/PyTorch references, and the fused engine
against running each feature's ops one by one."""

import struct

import farmhash
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis import RaggedTensor, _native
from recis.features import (
    Bucketize,
    Feature,
    FeatureCross,
    FeatureEngine,
    FeatureOpError,
    FillMissing,
    Hash,
    IDMultiHash,
    Lambda,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
    StringColumn,
)

U64 = 2**64
INT64 = st.integers(-(2**63), 2**63 - 1)
ROWS = st.lists(st.lists(INT64, max_size=5), max_size=12)  # includes empty rows and empty batches


def ragged(rows) -> RaggedTensor:
    values = torch.tensor([x for r in rows for x in r], dtype=torch.int64)
    return RaggedTensor.from_lengths(values, torch.tensor([len(r) for r in rows], dtype=torch.int64))


def rows_of(rt: RaggedTensor) -> list:
    o = rt.offsets.tolist()
    v = rt.values.tolist()
    return [v[o[i] : o[i + 1]] for i in range(len(o) - 1)]


def signed(u: int) -> int:
    return u - U64 if u >= 2**63 else u


def fp_ids(*xs: int) -> int:
    return farmhash.fingerprint64(b"".join(struct.pack("<q", x) for x in xs))


# -- the hash ------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_fingerprint64_matches_pyfarmhash(data):
    assert _native.fingerprint64(data) == farmhash.fingerprint64(data)


def test_fingerprint64_published_vectors():
    # The README's table; each equals pyfarmhash (checked below too).
    vectors = {
        b"": 11160318154034397263,
        b"a": 12917804110809363939,
        b"hello": 13009744463427800296,
        b"user_42": 2770529383709671217,
        b"0123456789" * 7: 5261878338456922136,
        b"x" * 200: 13938988265971950527,
    }
    for data, h in vectors.items():
        assert _native.fingerprint64(data) == h == farmhash.fingerprint64(data)
    for n in (63, 64, 65, 127, 128, 129, 192, 256, 1000, 4096):
        data = bytes(range(256)) * (n // 256 + 1)
        assert _native.fingerprint64(data[:n]) == farmhash.fingerprint64(data[:n])


@given(st.lists(st.lists(st.text(max_size=20), max_size=4), max_size=10), st.sampled_from([0, 1, 1000, 2**63 + 5]))
def test_hash_of_strings_equals_fingerprint_mod_bucket(rows, bucket):
    out = Hash(bucket)(StringColumn.from_list(rows))
    if not rows:  # an empty batch: no strings either way
        assert out.numel() == 0
        return
    expect = []
    for r in rows:
        h = [farmhash.fingerprint64(s.encode()) for s in r]
        expect.append([signed(x % bucket) if bucket else signed(x) for x in h])
    assert rows_of(out) == expect


def test_hash_of_one_string_a_sample_is_dense_and_empty_string_is_pinned():
    out = Hash()(StringColumn.from_list(["", "a"]))
    assert out.tolist() == [signed(11160318154034397263), signed(12917804110809363939)]


def test_string_column_from_arrow_matches_from_list():
    rows = [["x", "yy"], [], ["zzz"]]
    arr = pa.array(rows, type=pa.list_(pa.string()))
    a, b = Hash(97)(StringColumn.from_arrow(arr)), Hash(97)(StringColumn.from_list(rows))
    assert rows_of(a) == rows_of(b)
    sliced = pa.array(["p", "q", "r", "s"]).slice(1, 2)
    assert Hash()(StringColumn.from_arrow(sliced)).tolist() == Hash()(StringColumn.from_list(["q", "r"])).tolist()


@given(ROWS, st.sampled_from([0, 7, 2**40]))
def test_hash_of_ids_hashes_their_little_endian_bytes(rows, bucket):
    out = Hash(bucket)(ragged(rows))
    assert rows_of(out) == [[signed(fp_ids(x) % bucket) if bucket else signed(fp_ids(x)) for x in r] for r in rows]


# -- id ops --------------------------------------------------------------------


@given(ROWS, st.integers(1, U64 - 1))
def test_mod_equals_python_mod_on_uint64(rows, m):
    out = Mod(m)(ragged(rows))
    assert rows_of(out) == [[signed((x & (U64 - 1)) % m) for x in r] for r in rows]


def test_mod_of_negative_ids_is_pinned():
    assert Mod(10)(torch.tensor([-1, 7])).tolist() == [5, 7]


@given(
    st.lists(st.floats(-100, 100, allow_nan=False), max_size=60),
    st.lists(st.floats(-100, 100, allow_nan=False), max_size=10),
)
def test_bucketize_equals_torch_bucketize(values, boundaries):
    boundaries = sorted(boundaries)
    x = torch.tensor(values + boundaries, dtype=torch.float64)  # values equal to boundaries too
    expect = torch.bucketize(x, torch.tensor(boundaries, dtype=torch.float64), right=False)
    assert torch.equal(Bucketize(boundaries)(x), expect)


def test_bucketize_boundary_side_nan_and_ints():
    b = Bucketize([1.0, 2.0])
    assert b(torch.tensor([0.5, 1.0, 1.5, 2.0, 9.0, float("nan")])).tolist() == [0, 0, 1, 1, 2, 2]
    assert b(torch.tensor([1, 2, 3])).tolist() == [0, 1, 2]


@given(ROWS, st.data())
def test_feature_cross_equals_python_reference(rows_a, data):
    rows_b = data.draw(st.lists(st.lists(INT64, max_size=4), min_size=len(rows_a), max_size=len(rows_a)))
    bucket = data.draw(st.sampled_from([0, 1000]))
    out = FeatureCross(bucket)([ragged(rows_a), ragged(rows_b)])
    expect = [
        [signed(fp_ids(a, b) % bucket) if bucket else signed(fp_ids(a, b)) for a in ra for b in rb]
        for ra, rb in zip(rows_a, rows_b, strict=True)
    ]
    assert rows_of(out) == expect


@given(ROWS, st.integers(0, 6), st.sampled_from(["left", "right"]))
def test_sequence_truncate_equals_list_slicing(rows, max_len, side):
    out = SequenceTruncate(max_len, side)(ragged(rows))
    expect = [r[:max_len] if side == "right" else r[max(0, len(r) - max_len) :] for r in rows]
    assert rows_of(out) == expect


def test_sequence_truncate_3d_and_padding():
    # 3-D: each sequence element is a pair.
    values = torch.arange(12).reshape(6, 2)
    rt = RaggedTensor(values, torch.tensor([0, 4, 4, 6]))
    out = SequenceTruncate(2, "left", pad=True, pad_value=-1)(rt)
    assert out.shape == (3, 2, 2)
    assert out.tolist() == [[[4, 5], [6, 7]], [[-1, -1], [-1, -1]], [[8, 9], [10, 11]]]
    dense = torch.arange(24).reshape(2, 4, 3)
    assert torch.equal(SequenceTruncate(3, "left")(dense), dense[:, 1:])
    assert torch.equal(SequenceTruncate(3)(dense[:, :, 0]), dense[:, :3, 0])


@given(ROWS, st.lists(st.integers(1, 2**62), min_size=1, max_size=4))
def test_id_multi_hash_equals_reference(rows, buckets):
    out = IDMultiHash(buckets)(ragged(rows))
    flat = [x for r in rows for x in r]
    expect = [
        [signed(farmhash.fingerprint64(struct.pack("<qQ", x, j)) % b) for j, b in enumerate(buckets)] for x in flat
    ]
    assert out.values.reshape(-1, len(buckets)).tolist() == expect
    assert torch.equal(out.offsets, ragged(rows).offsets)


def test_fill_missing_fills_empty_rows_and_nan():
    rt = RaggedTensor(torch.tensor([3, 4]), torch.tensor([0, 0, 2, 2]), torch.tensor([0.5, 0.25]))
    out = FillMissing(-7)(rt)
    assert rows_of(out) == [[-7], [3, 4], [-7]]
    assert out.weights.tolist() == [1.0, 0.5, 0.25, 1.0]
    assert FillMissing(0.0)(torch.tensor([1.0, float("nan")])).tolist() == [1.0, 0.0]


# -- the engine --------------------------------------------------------------------


def make_batch(rng, b=64):
    ids = lambda: ragged([list(rng.integers(-(2**40), 2**40, rng.integers(0, 4))) for _ in range(b)])  # noqa: E731
    return {
        "user": StringColumn.from_list([f"u{rng.integers(1000)}" for _ in range(b)]),
        "tags": StringColumn.from_list([[f"t{x}" for x in rng.integers(0, 50, rng.integers(0, 3))] for _ in range(b)]),
        "item": ids(),
        "shop": ids(),
        "hist": ids(),
        "price": torch.tensor(rng.random(b) * 100),
        "label": torch.tensor(rng.integers(0, 2, b), dtype=torch.float32),
        "dense": torch.tensor(rng.random((b, 3)), dtype=torch.float32),
    }


def make_features():
    return [
        Feature("user").add_op(Hash()).add_op(Mod(1 << 20)),
        Feature("tags").add_op(Hash(1 << 16)),
        Feature("item_mod").add_op(SelectField("item")).add_op(Mod(9973)),
        Feature("item").add_op(Hash()).add_op(Mod(1 << 24)),
        Feature("shop").add_op(Mod(777)).add_op(IDMultiHash([100, 200])),
        Feature("price").add_op(Bucketize([1.0, 10.0, 50.0])),
        Feature("item_x_shop").add_op(SelectFields(["item", "shop"])).add_op(FeatureCross(1 << 20)),
        Feature("hist").add_op(SequenceTruncate(2, "left")).add_op(FillMissing(0)),
        Feature("hist_len").add_op(SelectField("hist")).add_op(Lambda(lambda rt: rt.lengths(), "lengths")),
    ]


def assert_same(a, b):
    if isinstance(a, RaggedTensor):
        assert torch.equal(a.values, b.values) and torch.equal(a.offsets, b.offsets)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a is b


def test_fused_engine_equals_feature_by_feature():
    batch = make_batch(np.random.default_rng(0))
    fused, unfused = FeatureEngine(make_features()), FeatureEngine(make_features(), fuse=False)
    a, b = fused(batch), unfused(batch)
    assert set(a) == set(b)
    for k in a:
        assert_same(a[k], b[k])
    # One native call per op type and depth: Hash over three features at depth 1, Mod over three.
    assert "depth 1: Hash x 3: user, tags, item" in fused.describe()
    assert "depth 2: Mod x 2: user, item" in fused.describe()


def test_unused_columns_pass_through_and_selected_ones_do_not():
    out = FeatureEngine(make_features())(make_batch(np.random.default_rng(1)))
    assert {"label", "dense"} <= set(out)
    assert "item" in out  # a feature is named item
    assert "tags" in out and isinstance(out["tags"], RaggedTensor)


def test_empty_batch():
    batch = make_batch(np.random.default_rng(2), b=0)
    out = FeatureEngine(make_features())(batch)
    assert out["user"].numel() == 0 and out["item_x_shop"].batch_size == 0


@pytest.mark.parametrize(
    "features,match",
    [
        (
            [Feature("f").add_op(SelectField("price")).add_op(Mod(3))],
            r"feature 'f': Mod: expected int64 ids, got float32",
        ),
        ([Feature("f").add_op(SelectField("nope"))], r"feature 'f': SelectField: column 'nope' is not in the batch"),
        (
            [Feature("f").add_op(SelectFields(["item", "short"])).add_op(FeatureCross())],
            r"feature 'f': FeatureCross: the two features have batch sizes 4 and 2",
        ),
        ([Feature("f").add_op(SelectField("price")).add_op(Hash())], r"feature 'f': Hash: expected int64 ids"),
    ],
)
def test_bad_input_names_feature_and_op(features, match):
    batch = {
        "item": ragged([[1], [2], [3], [4]]),
        "short": ragged([[1], [2]]),
        "price": torch.tensor([1.5, 2.0]),
    }
    with pytest.raises(FeatureOpError, match=match):
        FeatureEngine(features)(batch)


def test_bad_parameters_are_refused():
    with pytest.raises(FeatureOpError, match="mod must be an int in"):
        Mod(0)
    with pytest.raises(FeatureOpError, match=r"boundaries must be sorted; boundaries\[0\]=2.0 > boundaries\[1\]=1.0"):
        Bucketize([2.0, 1.0])
    with pytest.raises(FeatureOpError, match="side must be 'left' or 'right'"):
        SequenceTruncate(3, side="middle")
    with pytest.raises(ValueError, match="repeated"):
        FeatureEngine([Feature("a"), Feature("a")])
