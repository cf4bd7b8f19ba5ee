"""Likelihood-ratio metrics of metrics.py (Cllr, PAV, minCllr, actual DCF), each recomputed from its definition."""

import math

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from e2e_verification.metrics import LLR_CLIP, act_dcf, cllr, compute_mindcf, llr_metrics, min_cllr, pav_llr


def gaussian_trials(seed, n=3000, p=0.3, mu=1.0):
    """Labels (n,) bool and scores N(+-mu, 1) (float64)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < p
    return rng.normal(size=n) + np.where(labels, mu, -mu), labels


def test_cllr_matches_its_definition():
    for seed in range(3):
        llr, labels = gaussian_trials(seed)
        llr = 2.0 * llr  # the true LLR of N(+-1, 1)
        expected = 0.5 * (
            np.mean([math.log2(1 + math.exp(-x)) for x in llr[labels]])
            + np.mean([math.log2(1 + math.exp(x)) for x in llr[~labels]])
        )
        assert cllr(llr, labels) == pytest.approx(expected, rel=1e-12)
        assert cllr(torch.tensor(llr, dtype=torch.float64), torch.tensor(labels)) == pytest.approx(expected, rel=1e-12)
    # float32 and int inputs are read as float64; the uninformative llr = 0 costs exactly 1 bit
    assert cllr(np.zeros(4, dtype=np.float32), [1, 0, 1, 0]) == pytest.approx(1.0, abs=1e-15)


def test_cllr_is_stable_for_large_llrs():
    # log2(1 + e^800) overflows naively; it is 800 / ln 2 to double precision
    assert cllr(np.array([800.0, 800.0]), np.array([True, False])) == pytest.approx(0.5 * 800 / math.log(2))
    assert cllr(np.array([800.0, -800.0]), np.array([True, False])) == 0.0
    assert cllr(np.array([-np.inf, 0.0]), np.array([True, False])) == np.inf


def pav_reference(scores, labels):
    """sklearn's isotonic (increasing) posterior, as LLRs clipped like pav_llr."""
    post = IsotonicRegression(increasing=True).fit_transform(scores, labels.astype(np.float64))
    with np.errstate(divide="ignore"):
        llr = np.log(post) - np.log1p(-post) - math.log(labels.sum() / (~labels).sum())
    return np.clip(llr, -LLR_CLIP, LLR_CLIP)


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_pav_matches_sklearn_isotonic_regression(decimals):
    scores, labels = gaussian_trials(7, n=2000)
    if decimals is not None:  # many tied scores, some ties across both classes
        scores = np.round(scores, decimals)
    ours = pav_llr(scores, labels)
    np.testing.assert_allclose(ours, pav_reference(scores, labels), rtol=0, atol=1e-10)
    assert np.all(np.diff(ours[np.argsort(scores, kind="stable")]) >= 0)  # monotone in the score
    for value in np.unique(scores):  # tied scores share one LLR
        assert np.ptp(ours[scores == value]) == 0


def test_pav_small_case_by_hand():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 4.0])
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    # PAV target rates: 0 | scores 1, 2 pooled: 1/2 | score 3 (1/1) and the tie group at 4 (1/2) pooled: 2/3.
    # Log prior odds log(3/3) = 0, so the LLRs are the logits -inf (clipped), 0, log 2.
    expected = [-LLR_CLIP, 0.0, 0.0, math.log(2), math.log(2), math.log(2)]
    np.testing.assert_allclose(pav_llr(scores, labels), expected, atol=1e-12)


def test_min_cllr_is_below_every_monotone_recalibration():
    scores, labels = gaussian_trials(3)
    best = min_cllr(scores, labels)
    assert best == pytest.approx(cllr(pav_llr(scores, labels), labels), abs=1e-12)
    transforms = [
        2.0 * scores,  # the true LLR
        scores,
        0.5 * scores - 1.0,
        3.0 * scores + 2.0,
        np.tanh(scores) * 4,
        scores**3,
        np.exp(scores) - 2.0,
    ]
    for llr in transforms:
        assert best <= cllr(llr, labels)
    assert cllr(2.0 * scores, labels) - best < 0.02  # the true LLR is nearly optimal already
    # minCllr depends only on the order of the scores
    assert min_cllr(np.exp(scores), labels) == pytest.approx(best, abs=1e-12)


def brute_act_dcf(llr, labels, p, c_miss, c_fa):
    """The actual DCF from its definition, one trial at a time."""
    threshold = math.log(c_fa * (1 - p) / (c_miss * p))
    misses = sum(1 for x, t in zip(llr, labels) if t and not x >= threshold)
    false_alarms = sum(1 for x, t in zip(llr, labels) if not t and x >= threshold)
    cost = c_miss * p * misses / labels.sum() + c_fa * (1 - p) * false_alarms / (~labels).sum()
    return cost / min(c_miss * p, c_fa * (1 - p))


@pytest.mark.parametrize("p,c_miss,c_fa", [(0.01, 1, 1), (0.05, 1, 1), (0.5, 1, 1), (0.2, 10, 1), (0.01, 1, 3)])
def test_act_dcf_matches_brute_force(p, c_miss, c_fa):
    scores, labels = gaussian_trials(11, n=1500)
    threshold = math.log(c_fa * (1 - p) / (c_miss * p))
    for llr in (2.0 * scores, scores + 1.0, 3.0 * scores - 2.0):
        llr = llr.copy()
        llr[:40] = threshold  # ties at the threshold are accepted
        expected = brute_act_dcf(llr, labels, p, c_miss, c_fa)
        assert act_dcf(llr, labels, p, c_miss, c_fa) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # actDCF is never below minDCF, and (nearly) reaches it for the true LLR
    llr = 2.0 * scores
    assert act_dcf(llr, labels, p, c_miss, c_fa) >= compute_mindcf(llr, labels, p, c_miss, c_fa) - 1e-12


def test_act_dcf_tie_convention():
    threshold = math.log(99.0)
    llr, labels = np.array([threshold, -5.0]), np.array([False, True])
    # the non-target at the threshold is accepted (false alarm), the target below it is missed
    assert act_dcf(llr, labels, 0.01) == pytest.approx((0.01 * 1 + 0.99 * 1) / 0.01)
    assert act_dcf(np.nextafter(llr, -np.inf), labels, 0.01) == pytest.approx(0.01 / 0.01)


def test_perfectly_separated_trials():
    labels = np.array([0, 0, 0, 1, 1, 1, 1], dtype=bool)
    scores = np.array([-3.0, -2.0, -2.0, 1.0, 1.5, 4.0, 4.0])
    assert min_cllr(scores, labels) == 0.0
    np.testing.assert_array_equal(pav_llr(scores, labels), np.where(labels, LLR_CLIP, -LLR_CLIP))
    assert cllr(pav_llr(scores, labels), labels) < 1e-20
    assert act_dcf(30 * scores, labels, 0.01) == 0.0
    out = llr_metrics(30 * scores, labels)
    assert out["min_cllr"] == 0.0 and out["act_dcf_0.01"] == 0.0 and out["act_dcf_0.05"] == 0.0


def test_llr_metrics_agrees_with_the_single_metrics():
    scores, labels = gaussian_trials(5)
    llr = 1.5 * scores - 0.3
    out = llr_metrics(torch.tensor(llr, dtype=torch.float32), torch.tensor(labels), p_targets=(0.01, 0.05, 0.5))
    assert list(out) == ["cllr", "min_cllr", "act_dcf_0.01", "act_dcf_0.05", "act_dcf_0.5"]
    llr32 = llr.astype(np.float32)
    assert out["cllr"] == pytest.approx(cllr(llr32, labels), rel=1e-12)
    assert out["min_cllr"] == pytest.approx(min_cllr(llr32, labels), rel=1e-12)
    for p in (0.01, 0.05, 0.5):
        assert out[f"act_dcf_{p:g}"] == pytest.approx(act_dcf(llr32, labels, p), rel=1e-12)


@pytest.mark.parametrize("fn", [cllr, pav_llr, min_cllr, llr_metrics, lambda s, y: act_dcf(s, y, 0.01)])
def test_degenerate_inputs_raise(fn):
    scores = np.array([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="target"):
        fn(scores, np.zeros(3, dtype=bool))  # no targets
    with pytest.raises(ValueError, match="target"):
        fn(scores, np.ones(3, dtype=bool))  # no non-targets
    with pytest.raises(ValueError, match="length"):
        fn(scores, np.array([True, False]))
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([0.1, np.nan, 0.9]), np.array([True, False, True]))
