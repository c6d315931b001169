"""Bad input to the sparse step gets an error naming the argument, and the
coalesced table stays unchanged (its ids, rows and values)."""

import numpy as np
import pytest
import torch

from recis import RaggedTensor, _native
from recis.nn import EmbeddingEngine, EmbeddingOption, NormalInit
from recis.optim import SparseAdam


def engine_and_opt():
    eng = EmbeddingEngine({f: EmbeddingOption(dim=4, initializer=NormalInit(0, 0.1)) for f in ("a", "b")})
    opt = SparseAdam(eng, lr=0.1)
    batch = {f: RaggedTensor.from_lengths(torch.tensor([1, 2, 3]), torch.tensor([2, 1])) for f in ("a", "b")}
    out = eng.stacked(batch)
    opt.zero_grad()
    out.sum().backward()
    opt.step()
    return eng, opt


def snapshot(eng):
    return {k: v.clone() for k, v in eng.tables()[0].state_dict().items()}


def assert_unchanged(eng, before):
    after = snapshot(eng)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], equal_nan=True, msg=k)


def test_decreasing_offsets_are_named_and_change_nothing():
    eng, _ = engine_and_opt()
    before = snapshot(eng)
    with pytest.raises(ValueError, match="offsets"):
        eng({"a": RaggedTensor(torch.tensor([5, 6]), torch.tensor([0, 2, 1])), "b": torch.tensor([[7]])})
    assert_unchanged(eng, before)


def test_offsets_not_ending_at_the_values_are_named():
    eng, _ = engine_and_opt()
    before = snapshot(eng)
    with pytest.raises(ValueError, match="offsets"):
        eng({"a": RaggedTensor(torch.tensor([5, 6, 8]), torch.tensor([0, 1, 2])), "b": torch.tensor([[7]])})
    assert_unchanged(eng, before)


def test_weights_of_the_wrong_length_are_named():
    eng = EmbeddingEngine({"a": EmbeddingOption(dim=4)})
    before = snapshot(eng)
    with pytest.raises(ValueError, match="weights"):
        eng({"a": RaggedTensor(torch.tensor([5, 6]), torch.tensor([0, 2]), torch.tensor([1.0]))})
    assert_unchanged(eng, before)


def test_ids_of_the_wrong_dtype_are_named():
    eng, _ = engine_and_opt()
    before = snapshot(eng)
    with pytest.raises(ValueError, match="'a'.*int64"):
        eng({"a": RaggedTensor(torch.tensor([5.0, 6.0]), torch.tensor([0, 2])), "b": torch.tensor([[7]])})
    assert_unchanged(eng, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_are_refused_and_change_nothing(bad):
    eng, opt = engine_and_opt()
    before = snapshot(eng)
    batch = {f: RaggedTensor.from_lengths(torch.tensor([1, 9]), torch.tensor([1, 1])) for f in ("a", "b")}
    out = eng.stacked(batch)
    opt.zero_grad()
    (out.sum() * bad).backward()
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    # The lookup inserted id 9 (a new row, as any training lookup does);
    # the rows that existed are unchanged.
    after = snapshot(eng)
    keep = [(int(n), int(i)) for n, i in zip(before["namespace"], before["ids"], strict=True)]
    now = {(int(n), int(i)): k for k, (n, i) in enumerate(zip(after["namespace"], after["ids"], strict=True))}
    for k, key in enumerate(keep):
        torch.testing.assert_close(after["values"][now[key]], before["values"][k])


def test_rows_named_by_the_caller_must_be_live():
    eng, opt = engine_and_opt()
    native = eng.tables()[0].native
    before = snapshot(eng)
    out = np.empty((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"rows\[0\] = 1000 is not a live row"):
        native.gather(np.array([1]), np.array([1000], np.uint32), False, out, 0)
    kernel = opt._kernel(opt.param_groups[0])
    errors = _native.apply_gradients_many(
        [native], [np.array([1000], np.uint32)], [np.array([0])], [np.ones((1, 4), np.float32)], kernel, 0.1, [1]
    )
    assert errors[0] is not None and "not a live row" in errors[0]
    assert_unchanged(eng, before)


def test_a_stale_ticket_is_refused_after_eviction():
    eng, opt = engine_and_opt()
    table = eng.tables()[0]
    batch = {f: RaggedTensor.from_lengths(torch.tensor([1, 2]), torch.tensor([1, 1])) for f in ("a", "b")}
    out = eng.stacked(batch)
    out.sum().backward()
    (tickets, index, grads) = table.pending_gradients()
    table.clear_pending()
    table.evict(ttl_steps=0, step=10**6)
    kernel = opt._kernel(opt.param_groups[0])
    before = snapshot(eng)
    errors = _native.apply_gradients_many([table.native], [tickets], [index], [grads], kernel, 0.1, [5])
    assert errors[0] is not None and "evicted or cleared" in errors[0]
    assert_unchanged(eng, before)
