"""recis.metrics against scikit-learn."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from recis.metrics import auc, log_loss


@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=2, max_size=300).filter(
        lambda xs: 0 < sum(y for y, _ in xs) < len(xs)
    )
)
def test_auc_matches_sklearn_with_ties(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs]) / 20.0  # few distinct scores: many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-9)


def test_auc_refuses_bad_labels():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auc([1, 1], [0.1, 0.2])


def test_streaming_auc_over_batches_equals_sklearn_on_all():
    from recis.metrics import AUROC

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.random(5000) + 0.3 * y, 2)  # rounded: many ties
    m = AUROC()
    for k in range(0, 5000, 700):
        m.update(y[k : k + 700], s[k : k + 700])
    assert m.compute() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    m2 = AUROC()
    m2.load_state_dict(m.state_dict())
    assert m2.compute() == m.compute()


def test_gauc_is_the_sample_weighted_mean_of_group_aucs():
    from recis.metrics import GAUC

    rng = np.random.default_rng(1)
    groups = rng.integers(0, 40, 3000)
    y = rng.integers(0, 2, 3000)
    s = rng.random(3000) + 0.2 * y
    m = GAUC()
    m.update(y[:1000], s[:1000], groups[:1000])
    m.update(y[1000:], s[1000:], groups[1000:])
    num = den = 0.0
    for g in np.unique(groups):
        k = groups == g
        if 0 < y[k].sum() < k.sum():
            num += roc_auc_score(y[k], s[k]) * k.sum()
            den += k.sum()
    assert m.compute() == pytest.approx(num / den, abs=1e-12)


def test_streaming_log_loss_and_calibration():
    from recis.metrics import Calibration, LogLoss

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    ll, cal = LogLoss(), Calibration()
    for k in range(0, 1000, 300):
        ll.update(y[k : k + 300], p[k : k + 300])
        cal.update(y[k : k + 300], p[k : k + 300])
    assert ll.compute() == pytest.approx(sk_log_loss(y, p), rel=1e-9)
    assert cal.compute() == pytest.approx(p.sum() / y.sum())


def test_streaming_metrics_refuse_bad_labels():
    from recis.metrics import AUROC

    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2.0"):
        AUROC().update([0, 2], [0.1, 0.2])
