"""Metrics recomputed independently (sklearn, brute force), atomic writes, safe checkpoint loading."""

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from tiny_data import PicklePayload

from e2e_verification.checkpoints import load_checkpoint, save_checkpoint
from e2e_verification.metrics import compute_auc, compute_eer, compute_metrics, compute_mindcf
from utils import UserError, atomic_write, make_parser, str2bool


def sklearn_eer(scores, labels):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    return (fnr[i] + fpr[i]) / 2


def brute_force_mindcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    tar, non = scores[labels == 1], scores[labels == 0]
    best = np.inf
    for thr in np.concatenate([np.unique(scores), [np.inf]]):
        p_miss = np.mean(tar < thr)
        p_fa = np.mean(non >= thr)
        best = min(best, c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa)
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


@pytest.mark.parametrize("seed", range(5))
def test_eer_mindcf_auc_match_independent_computations_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # rounding makes many ties
    assert len(np.unique(scores)) < n // 5
    assert abs(compute_eer(scores, labels) - sklearn_eer(scores, labels)) < 1e-6
    assert abs(compute_auc(scores, labels) - roc_auc_score(labels, scores)) < 1e-9
    for p in (0.01, 0.05, 0.5):
        assert abs(compute_mindcf(scores, labels, p_target=p) - brute_force_mindcf(scores, labels, p)) < 1e-9
    assert (
        abs(compute_mindcf(scores, labels, 0.05, c_miss=10, c_fa=1) - brute_force_mindcf(scores, labels, 0.05, 10, 1))
        < 1e-9
    )


def test_metrics_accept_tensors_and_agree_with_arrays(device):
    rng = np.random.default_rng(7)
    labels = rng.random(500) < 0.5
    scores = rng.normal(labels.astype(float), 1.0).astype(np.float32)
    from_numpy = compute_metrics(scores, labels)
    from_torch = compute_metrics(torch.from_numpy(scores).to(device), torch.from_numpy(labels).to(device))
    for key, value in from_numpy.items():
        assert abs(value - from_torch[key]) < 1e-6, key
    assert set(from_numpy) == {"eer", "mindcf_0.01", "mindcf_0.05", "auc"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_branch_of_the_counts_equals_the_numpy_branch(dtype):
    # The torch ops that sort scores on a GPU, run here on CPU tensors, against the numpy sort the
    # CPU uses (a packed int64 value sort for float32); signed zeros and ties included.
    from e2e_verification import metrics

    rng = np.random.default_rng(3)
    for decimals in (0, 2, None):
        labels = rng.random(2000) < 0.2
        scores = rng.normal(labels.astype(float), 1.0)
        scores = (np.round(scores, decimals) if decimals is not None else scores).astype(dtype)
        scores[:50] = np.where(rng.random(50) < 0.5, -0.0, 0.0)
        want = metrics._numpy_counts(scores, labels)
        got = metrics._torch_counts(torch.from_numpy(scores), torch.from_numpy(labels))
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g.numpy(), w)
        n_tar, n_non = int(labels.sum()), int((~labels).sum())
        eer = metrics._eer(*want, n_tar, n_non)
        assert metrics._eer(*got, n_tar, n_non) == eer and abs(eer - sklearn_eer(scores, labels)) < 1e-12


def test_metric_edge_cases():
    assert compute_eer([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 0.0
    assert compute_eer([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 1.0
    assert compute_eer([0.5] * 4, [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        compute_eer([0.1, float("nan")], [1, 0])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "scores.txt"
    with pytest.raises(RuntimeError), atomic_write(str(target)) as handle:
        handle.write("partial")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_write(str(target)) as handle:
        handle.write("done")
    assert target.read_text() == "done" and os.listdir(tmp_path) == ["scores.txt"]
    with pytest.raises(UserError, match="does not exist"), atomic_write(str(tmp_path / "no" / "x.txt")):
        pass


def test_checkpoints_load_weights_only(tmp_path):
    good = str(tmp_path / "good.pt")
    save_checkpoint(good, {"model_config": {"model": "resnet"}, "model_state": {"w": torch.ones(2)}, "h": [0.5]})
    assert torch.equal(load_checkpoint(good)["model_state"]["w"], torch.ones(2))
    marker = tmp_path / "pwned"
    bad = str(tmp_path / "bad.pt")
    torch.save({"model_config": {}, "model_state": {}, "x": PicklePayload(str(marker))}, bad)
    with pytest.raises(UserError, match="weights only"):
        load_checkpoint(bad)
    assert not marker.exists()
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_str2bool_is_strict():
    assert str2bool("True") is True and str2bool("false") is False
    with pytest.raises(ValueError):
        str2bool("maybe")


def test_make_parser_reads_option_tables_and_titled_sections():
    runs = {"--seeds": (str, "1,2", "seeds"), "--fast": ("a switch",)}
    files = {("--out", "-o"): dict(required=True, help="where to write")}
    parser = make_parser(
        "doc", "example: x", {"--threads": (int, 2, "threads")}, ("what to run", runs), ("files", files)
    )
    args = parser.parse_args(["-o", "x.md", "--fast", "--threads", "3"])
    assert (args.seeds, args.fast, args.threads, args.out) == ("1,2", True, 3, "x.md")
    sections = {group.title: [a.dest for a in group._group_actions] for group in parser._action_groups}
    assert sections["what to run"] == ["seeds", "fast"] and sections["files"] == ["out"]
    assert "threads" in sections["options"]
    with pytest.raises(UserError, match="--threads"):
        parser.parse_args(["--threads", "x", "-o", "y"])
