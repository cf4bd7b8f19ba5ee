"""calibration.py: linear calibration and fusion against Gaussian scores whose true LLR is known, the
parameter file round trip and its checks, and the score-file reader."""

import json

import numpy as np
import pytest
import torch

from e2e_verification.calibration import (
    apply_calibration,
    fit_calibration,
    load_calibration,
    read_score_file,
    train_linear_llr,
)
from e2e_verification.metrics import act_dcf, cllr, compute_mindcf, min_cllr
from utils import UserError, write_json


def gaussian_scores(seed, n_tar, n_non, mus=(1.0,), scales=(1.0,), shifts=(0.0,)):
    """Labels and independent score columns x_k = scale_k * N(+-mu_k, 1) + shift_k.

    The true LLR of column k alone is 2 mu_k (x_k - shift_k) / scale_k, and of all columns their sum.
    """
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.ones(n_tar, bool), np.zeros(n_non, bool)])
    sign = np.where(labels, 1.0, -1.0)
    cols = [sc * (rng.normal(size=labels.size) + mu * sign) + sh for mu, sc, sh in zip(mus, scales, shifts)]
    return labels, cols


@pytest.mark.parametrize("p_target", [0.5, 0.05, 0.01])
@pytest.mark.parametrize(
    "mu,scale,shift,n_tar", [(1.0, 1.0, 0.0, 20000), (1.5, 0.2, 0.3, 5000), (0.7, 4.0, -2.0, 40000)]
)
def test_linear_calibration_recovers_the_true_llr(p_target, mu, scale, shift, n_tar):
    labels, (x,) = gaussian_scores(1, n_tar, 40000, (mu,), (scale,), (shift,))
    (a,), b = train_linear_llr(x, labels, p_target)
    true_a, true_b = 2 * mu / scale, -2 * mu * shift / scale
    assert a == pytest.approx(true_a, rel=0.06)
    assert b == pytest.approx(true_b, abs=0.06 * (1 + abs(true_b)))


def test_calibrated_act_dcf_is_near_min_dcf_on_held_out_trials():
    p = 0.01
    labels, (x,) = gaussian_scores(2, 20000, 200000, (1.5,), (0.3,), (0.1,))
    rng = np.random.default_rng(0)
    dev = rng.random(labels.size) < 0.5
    params = fit_calibration({"s": x[dev]}, labels[dev], p)
    llr = apply_calibration(params, {"s": x[~dev]})["cal_s"]
    mindcf = compute_mindcf(llr, labels[~dev], p)
    actual = act_dcf(llr, labels[~dev], p)
    assert mindcf <= actual <= 1.1 * mindcf
    # the raw scores read as LLRs are badly calibrated, so calibration is what closes the gap
    assert act_dcf(x[~dev], labels[~dev], p) > 1.5 * mindcf
    assert cllr(llr, labels[~dev]) < 1.02 * min_cllr(llr, labels[~dev])


def test_fusion_beats_each_informative_score():
    p = 0.01
    labels, (x1, x2) = gaussian_scores(3, 10000, 60000, (1.0, 0.8), (1.0, 0.1), (0.0, 0.5))
    params = fit_calibration({"x1": x1, "x2": x2}, labels, p, fusions=[["x1", "x2"]])
    fusion = params["fusions"]["x1+x2"]
    # the true fused LLR is 2 x1 + 16 (x2 - 0.5)
    assert fusion["weights"]["x1"] == pytest.approx(2.0, rel=0.06)
    assert fusion["weights"]["x2"] == pytest.approx(16.0, rel=0.06)
    assert fusion["bias"] == pytest.approx(-8.0, abs=0.4)
    out = apply_calibration(params, {"x1": x1, "x2": x2})
    assert set(out) == {"cal_x1", "cal_x2", "cal_x1+x2"}
    for name in ("cal_x1", "cal_x2"):
        assert compute_mindcf(out["cal_x1+x2"], labels, p) < compute_mindcf(out[name], labels, p)
        assert cllr(out["cal_x1+x2"], labels) < cllr(out[name], labels)
        assert min_cllr(out["cal_x1+x2"], labels) < min_cllr(out[name], labels)


def test_prior_weighting_ignores_the_class_proportions():
    # the same score distributions with 1:1 and 1:10 class counts calibrate (nearly) alike
    p = 0.05
    a_b = []
    for n_tar in (30000, 3000):
        labels, (x,) = gaussian_scores(4, n_tar, 30000, (1.0,))
        (a,), b = train_linear_llr(x, labels, p)
        a_b.append((a, b))
    assert a_b[0][0] == pytest.approx(a_b[1][0], rel=0.06)
    assert a_b[0][1] == pytest.approx(a_b[1][1], abs=0.1)


def test_separated_dev_trials_give_finite_parameters():
    labels = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    params = fit_calibration({"s": np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])}, labels, 0.01)
    assert np.isfinite([params["calibrations"]["s"]["a"], params["calibrations"]["s"]["b"]]).all()
    assert params["calibrations"]["s"]["a"] > 1.0


def test_parameters_round_trip_through_json(tmp_path):
    labels, (x1, x2) = gaussian_scores(5, 500, 2000, (1.0, 1.0), (1.0, 1.0), (0.0, 0.0))
    columns = {"e2e_logit": x1, "cos": x2}
    params = fit_calibration(columns, labels, 0.05, fusions=[["e2e_logit", "cos"]], scorers=["cos"])
    assert list(params["calibrations"]) == ["cos"] and list(params["fusions"]) == ["e2e_logit+cos"]
    path = str(tmp_path / "cal.json")
    write_json(path, params)
    loaded = load_calibration(path, columns=["cos", "e2e_logit", "e2e"])
    assert loaded == params
    ours = apply_calibration(loaded, columns)
    # applied to tensors it gives tensors with the same values
    as_tensors = apply_calibration(loaded, {k: torch.tensor(v) for k, v in columns.items()})
    for name, values in ours.items():
        assert isinstance(as_tensors[name], torch.Tensor)
        np.testing.assert_allclose(as_tensors[name].numpy(), values, rtol=1e-12)
    cal = params["calibrations"]["cos"]
    np.testing.assert_allclose(ours["cal_cos"], cal["a"] * x2 + cal["b"], rtol=1e-12)


GOOD = {"p_target": 0.01, "calibrations": {"cos": {"a": 2.0, "b": -1.0}}, "fusions": {}}


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "cannot read calibration file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ({**GOOD, "p_target": 1.5}, "p_target"),
        ({**GOOD, "p_target": "0.01"}, "p_target must be a finite number"),
        ({**GOOD, "calibrations": {"cos": {"a": 2.0}}}, "calibrations.cos.b"),
        ({**GOOD, "calibrations": {"cos": {"a": "x", "b": 1}}}, "calibrations.cos.a"),
        ({**GOOD, "fusions": {"a+b": {"weights": {}, "bias": 0}}}, "fusions.a\\+b"),
        ({**GOOD, "fusions": {"a+b": {"weights": {"a": 1, "b": None}, "bias": 0}}}, "weights.b"),
        ({**GOOD, "calibrations": {}}, "no calibration"),
        ({**GOOD, "calibrations": {"plda": {"a": 1, "b": 0}}}, "no column 'plda'"),
    ],
)
def test_load_calibration_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=match) as err:
        load_calibration(str(path), columns=["e2e", "cos", "fus"])
    assert "\n" not in str(err.value)


def test_apply_and_fit_name_a_missing_column():
    with pytest.raises(UserError, match="no column 'cos'"):
        apply_calibration(GOOD, {"e2e": np.zeros(3)})
    with pytest.raises(UserError, match="no column 'x'"):
        fit_calibration({"s": np.arange(4.0)}, [1, 0, 1, 0], 0.01, fusions=[["s", "x"]])
    with pytest.raises(UserError, match="target and non-target"):
        fit_calibration({"s": np.arange(4.0)}, [0, 0, 0, 0], 0.01)
    with pytest.raises(UserError, match="two or more"):
        fit_calibration({"s": np.arange(4.0)}, [1, 0, 1, 0], 0.01, fusions=[["s", "s"]])


def test_read_score_file_with_and_without_header(tmp_path):
    body = "a b 0.9 2.1 0.5 0.7 target\nc d 0.1 -2.0 -0.25 -0.1 nontarget\n\n"
    path = tmp_path / "with_header"
    path.write_text("# enroll test e2e e2e_logit cos fus label\n" + body)
    columns, labels, enroll, test = read_score_file(str(path))
    assert list(columns) == ["e2e", "e2e_logit", "cos", "fus"]
    np.testing.assert_array_equal(columns["e2e_logit"], [2.1, -2.0])
    assert columns["cos"].dtype == np.float64
    assert labels.tolist() == [True, False] and enroll == ["a", "c"] and test == ["b", "d"]
    legacy = tmp_path / "legacy"
    legacy.write_text("a b 0.9 0.5 0.7 target\nc d 0.1 -0.25 -0.1 nontarget\n")
    columns, labels, _, _ = read_score_file(str(legacy))
    assert list(columns) == ["e2e", "cos", "fus"]
    np.testing.assert_array_equal(columns["cos"], [0.5, -0.25])


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "no trials"),
        ("a b 0.9 0.5 0.7 target\na b 0.9 0.5 target\n", ":2: expected 6 fields"),
        ("a b 0.9 0.5 0.7 target\na b 0.9 x 0.7 target\n", ":2: a score is not a number"),
        ("a b 0.9 0.5 nan target\n", ":1: scores must be finite"),
        ("a b 0.9 0.5 0.7 same\n", ":1: the label must be target or nontarget"),
        ("# enroll e2e label\na b 0.9 target\n", ":1: a header must read"),
        ("# enroll test cos cos label\n", ":1: repeated"),
    ],
)
def test_read_score_file_names_the_bad_line(tmp_path, text, match):
    path = tmp_path / "scores"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as err:
        read_score_file(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
