"""HashTable behaviour against a plain Python dict, and its bad-input errors."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis import _native
from recis.nn import (
    NO_ROW,
    ConstantInit,
    CountAdmit,
    EmbeddingOption,
    EvictionOption,
    HashTable,
    KaimingUniformInit,
    NormalInit,
    ProbabilityAdmit,
    TruncatedNormalInit,
    XavierNormalInit,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
IDS = st.lists(st.one_of(st.integers(-20, 20), INT64), max_size=40)


def small(dim=3, **kw):
    return HashTable(EmbeddingOption(dim=dim, num_shards=4, initial_capacity=8, **kw), "t")


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), IDS),
        st.tuples(st.just("lookup"), IDS),
        st.tuples(st.just("evict_ttl"), st.integers(0, 3)),
        st.tuples(st.just("evict_cap"), st.integers(0, 10)),
        st.tuples(st.just("reload"), st.none()),
    ),
    max_size=25,
)


@given(OPS)
def test_random_op_sequences_agree_with_a_dict(ops):
    table = small()
    model: dict[int, int] = {}  # id -> last step seen
    for step, (op, arg) in enumerate(ops, start=1):
        table.step = step
        if op == "insert":
            rows = table.native.lookup_or_insert(np.array(arg, dtype=np.int64), step)
            assert (rows != NO_ROW).all()
            for i in arg:
                model[i] = step
        elif op == "lookup":
            rows = table.lookup(torch.tensor(arg, dtype=torch.int64))
            assert [r != NO_ROW for r in rows] == [i in model for i in arg]
        elif op == "evict_ttl":
            gone = set(table.evict(ttl_steps=arg).tolist())
            expect = {i for i, s in model.items() if step - s > arg}
            assert gone == expect
            model = {i: s for i, s in model.items() if i not in gone}
        elif op == "evict_cap":
            gone = table.evict(max_rows=arg, score="lru").tolist()
            assert len(gone) == max(0, len(model) - arg)
            # Every evicted id was seen no later than every kept one.
            kept_steps = [s for i, s in model.items() if i not in set(gone)]
            if gone and kept_steps:
                assert max(model[i] for i in gone) <= min(kept_steps)
            model = {i: s for i, s in model.items() if i not in set(gone)}
        else:
            state = table.state_dict()
            table = small()
            table.load_state_dict(state)
        assert len(table) == len(model)
    assert sorted(table.state_dict()["ids"].tolist()) == sorted(model)


NS_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 2), IDS),
        st.tuples(st.just("lookup"), st.integers(0, 2), IDS),
        st.tuples(st.just("evict_ttl"), st.none(), st.integers(0, 3)),
        st.tuples(st.just("reload"), st.none(), st.none()),
    ),
    max_size=25,
)
NAMESPACES = [("x", 1), ("y", 2), ("z", 3)]


def coalesced():
    option = EmbeddingOption(dim=3, num_shards=4, initial_capacity=8, initializer=NormalInit(0.0, 1.0))
    return HashTable(option, "xyz", NAMESPACES)


@given(NS_OPS)
def test_namespaces_agree_with_a_dict_keyed_by_namespace_and_id(ops):
    # Three namespaces of one table, through the bindings and the
    # state_dict / load_state_dict round trip: the same id in two namespaces
    # is two rows, each read as its namespace's seed starts it.
    table = coalesced()
    model: dict[tuple[int, int], int] = {}  # (namespace, id) -> last step seen
    for step, (op, ns, arg) in enumerate(ops, start=1):
        table.step = step
        if op == "insert":
            table.lookup_unique(np.array(arg, dtype=np.int64), train=True, ns=ns)
            model.update({(ns, i): step for i in arg})
        elif op == "lookup":
            rows = table.lookup(torch.tensor(arg, dtype=torch.int64), ns)
            assert [r != NO_ROW for r in rows] == [(ns, i) in model for i in arg]
        elif op == "evict_ttl":
            gone = table.evict(ttl_steps=arg, by_namespace=True)
            got = {(k, i) for k, (name, _) in enumerate(NAMESPACES) for i in gone[name].tolist()}
            assert got == {key for key, s in model.items() if step - s > arg}
            model = {key: s for key, s in model.items() if key not in got}
        else:
            state = table.state_dict()
            table = coalesced()
            table.load_state_dict(state)
        assert len(table) == len(model)
        for k in range(3):
            assert table.native.len_in(k) == sum(1 for n, _ in model if n == k)
    for k, (name, seed) in enumerate(NAMESPACES):
        ids = torch.tensor(sorted(i for n, i in model if n == k), dtype=torch.int64)
        alone = HashTable(EmbeddingOption(dim=3, initializer=NormalInit(0.0, 1.0), seed=seed), name)
        assert torch.equal(table.view(name).embeddings(ids), alone.initial_values(ids))


@given(st.lists(INT64, min_size=1, max_size=200))
def test_inverse_and_counts_reconstruct_the_batch(ids):
    table = small()
    uniq, rows, inverse, counts = table.lookup_unique(np.array(ids, dtype=np.int64), train=True)
    assert len(set(uniq.tolist())) == len(uniq) == len(set(ids))
    assert uniq[inverse].tolist() == ids
    assert dict(zip(uniq.tolist(), counts.tolist(), strict=True)) == {i: ids.count(i) for i in set(ids)}


def test_initial_values_are_independent_of_order_and_threads():
    ids = torch.arange(-500, 500) * 7919
    a, b = small(8, initializer=NormalInit(0, 1)), small(8, initializer=NormalInit(0, 1))
    a.native.lookup_or_insert(ids.numpy(), 1)
    for chunk in ids.flip(0).split(13):
        b.native.lookup_or_insert(chunk.numpy(), 1)
    torch.testing.assert_close(a.embeddings(ids), b.embeddings(ids), rtol=0, atol=0)
    torch.testing.assert_close(a.embeddings(ids), a.initial_values(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "init,check",
    [
        (ConstantInit(0.25), lambda x: bool((x == 0.25).all())),
        (TruncatedNormalInit(0, 1, -0.5, 0.5), lambda x: bool((x.abs() <= 0.5).all())),
        (KaimingUniformInit(1.0), lambda x: bool((x.abs() <= (3 / 16) ** 0.5).all())),
        (XavierNormalInit(1.0), lambda x: abs(float(x.std()) - (1 / 16) ** 0.5) < 0.01),
    ],
)
def test_initializers(init, check):
    t = small(16, initializer=init)
    assert check(t.initial_values(torch.arange(4000)))


def test_admission_after_k_sightings():
    t = small(admission=CountAdmit(k=2))
    assert (t.native.lookup_or_insert(np.array([5, 6]), 1) == NO_ROW).all()
    rows = t.native.lookup_or_insert(np.array([5, 7, 7]), 2)
    assert rows[0] != NO_ROW and rows[1] == rows[2] != NO_ROW
    assert len(t) == 2


def test_admission_with_probability():
    t = small(admission=ProbabilityAdmit(p=0.3))
    rows = t.native.lookup_or_insert(np.arange(10_000, dtype=np.int64), 1)
    admitted = int((rows != NO_ROW).sum())
    assert 2700 < admitted < 3300
    assert len(t) == admitted


def test_eviction_from_option_and_row_reuse():
    t = small(eviction=EvictionOption(min_frequency=2))
    t.native.lookup_or_insert(np.array([1, 1, 2, 3, 3]), 1)
    assert sorted(t.evict().tolist()) == [2]
    before = t.stats()["rows_allocated"]
    t.native.lookup_or_insert(np.array([9]), 2)
    assert t.stats()["rows_allocated"] == before  # the freed row was reused
    with pytest.raises(ValueError, match="score must be 'lru' or 'lfu'"):
        EvictionOption(score="fifo")


def test_state_dict_refuses_rows_of_another_width():
    a, b = small(3), small(4)
    a.native.lookup_or_insert(np.array([1, 2]), 1)
    b.native.lookup_or_insert(np.array([7]), 1)
    with pytest.raises(ValueError, match="rows are 4 wide"):
        b.load_state_dict(a.state_dict())
    assert len(b) == 1  # unchanged


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([1.0, 2.0]), "must be int64"),
        (torch.tensor([[1, 2]]), "must be 1-D"),
        ([1, 2], "must be a torch.Tensor"),
    ],
)
def test_bad_ids_are_refused(ids, match):
    t = small()
    with pytest.raises((ValueError, TypeError), match=match):
        t.lookup(ids)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        EmbeddingOption(dim=0)
    with pytest.raises(ValueError, match="combiner"):
        EmbeddingOption(dim=2, combiner="max")
    with pytest.raises(ValueError, match="low < high"):
        HashTable(EmbeddingOption(dim=2, initializer=TruncatedNormalInit(0, 1, 1, -1)))
    with pytest.raises(ValueError, match="probability p must be in"):
        HashTable(EmbeddingOption(dim=2, admission=ProbabilityAdmit(p=2.0)))


def test_eight_python_threads_share_one_table():
    t = small(2)
    results = [None] * 8

    def work(k):
        ids = np.arange(k * 3000, k * 3000 + 12_000, dtype=np.int64)
        results[k] = dict(zip(ids.tolist(), t.native.lookup_or_insert(ids, k).tolist(), strict=True))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    merged: dict[int, int] = {}
    for r in results:
        for i, row in r.items():
            assert merged.setdefault(i, row) == row
    assert len(t) == len(merged) == len(set(merged.values()))


def test_lookup_gather_many_equals_lookup_then_gather():
    """The engine's one-call lookup + gather against the two steps it fuses."""
    a = HashTable(EmbeddingOption(dim=3, initializer=NormalInit(0, 1)), "a", [("x", 1), ("y", 2)])
    b = HashTable(EmbeddingOption(dim=3, initializer=NormalInit(0, 1), seed=9), "b")
    twin_a = HashTable(EmbeddingOption(dim=3, initializer=NormalInit(0, 1)), "a", [("x", 1), ("y", 2)])
    twin_b = HashTable(EmbeddingOption(dim=3, initializer=NormalInit(0, 1), seed=9), "b")
    ids = [np.array([5, 6, 5, 7]), np.array([5, 8]), np.array([1, 1, 2])]
    insert, initial = [True, False, True], [True, True, False]
    block, inverse, rows, sizes, runs = _native.lookup_gather_many(
        [a.native, a.native, b.native], ids, [0, 0, 0], insert, [0, 1, 0], initial
    )
    # One ticket per run of trainable lookups of one table: request 0 (a, x)
    # and request 2 (b); request 1 reads.
    assert [(s, e) for s, e, _ in runs] == [(0, 1), (2, 3)]
    assert np.array_equal(runs[0][2].rows(), rows[0]) and np.array_equal(runs[1][2].rows(), rows[2])
    found = _native.lookup_unique_many([twin_a.native, twin_a.native, twin_b.native], ids, [0, 0, 0], insert, [0, 1, 0])
    lo = 0
    for k, (t, (uniq, r, inv, _), ns) in enumerate(zip([twin_a, twin_a, twin_b], found, [0, 1, 0], strict=True)):
        assert sizes[k] == len(r) and np.array_equal(rows[k], r)
        want = np.empty((len(r), 3), np.float32)
        t.native.gather(uniq, r, initial[k], want, ns)
        np.testing.assert_array_equal(block[lo : lo + len(r)], want)
        np.testing.assert_array_equal(inverse[sum(len(x) for x in ids[:k]) :][: len(inv)], inv + lo)
        lo += len(r)
    assert len(a) == len(twin_a) == 3 and len(b) == 2  # namespace y was read, not written
    with pytest.raises(ValueError, match="dim"):
        c = HashTable(EmbeddingOption(dim=4), "c")
        _native.lookup_gather_many([a.native, c.native], ids[:2], [0, 0], [False, False], [0, 0], [False, False])
