"""plots.py and eval.py --plot: DET curves on normal-deviate axes and score histograms, written as PNGs."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import make_image_tree, run_on_terminal, write_checkpoint, write_kaldi_dir

import eval as eval_script
from e2e_verification import plots, scoring
from e2e_verification.metrics import compute_metrics, roc_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORERS = [s.name for s in scoring.SCORERS]


def synthetic_scores(n_tar=400, n_non=4000, seed=0):
    rng = np.random.default_rng(seed)
    target = np.r_[np.ones(n_tar, bool), np.zeros(n_non, bool)]
    base = np.r_[rng.normal(2.0, 1.0, n_tar), rng.normal(0.0, 1.0, n_non)].astype(np.float32)
    scores = {"e2e": torch.sigmoid(torch.from_numpy(base)), "cos": torch.from_numpy(np.tanh(base / 3)), "fus": base}
    return {**scores, "e2e_logit": 2 * base}, target


def test_probit_is_the_normal_quantile():
    z = plots.probit([0.5, 0.8413447460685429, 0.02275013194817921, 0.0, 1.0])
    assert np.allclose(z[:3], [0.0, 1.0, -2.0], atol=1e-9)
    assert np.isfinite(z).all() and z[3] < -5 and z[4] > 5


def test_det_points_are_a_thinned_monotone_staircase():
    scores, target = synthetic_scores(n_tar=3000, n_non=30000)
    fnr, fpr = (t.numpy() for t in roc_points(scores["fus"], target))
    x, y = plots.det_points(fnr, fpr)
    assert len(x) < len(fnr) / 4
    assert (np.diff(x) >= 0).all() and (np.diff(y) <= 0).all()
    floor = plots.DET_TICKS[0]
    assert (x[0], y[0]) == tuple(plots.probit([max(fpr[0], floor), max(fnr[0], floor)]))
    assert (x[-1], y[-1]) == tuple(plots.probit([max(fpr[-1], floor), max(fnr[-1], floor)]))


def test_eer_threshold_splits_the_errors_at_the_eer():
    scores, target = synthetic_scores()
    values = scores["fus"]
    fnr, fpr = (t.numpy() for t in roc_points(values, target))
    threshold = plots.eer_threshold(values, fnr, fpr)
    miss = (values[target] < threshold).mean()
    false_alarm = (values[~target] >= threshold).mean()
    eer = compute_metrics(values, target)["eer"]
    assert abs(miss - eer) < 0.01 and abs(false_alarm - eer) < 0.01


def test_write_plots_gives_two_pngs_per_scorer_and_no_temp_files(tmp_path):
    scores, target = synthetic_scores()
    prefix = str(tmp_path / "scores.out")
    written = plots.write_plots(prefix, scores, torch.from_numpy(target))
    expected = {f"scores.out.{s}_{kind}.png" for s in SCORERS for kind in ("det", "hist")}
    assert {os.path.basename(p) for p in written} == expected
    assert set(os.listdir(tmp_path)) == expected
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size == ((600, 600) if path.endswith("_det.png") else (700, 450))
            pixels = np.asarray(img.convert("RGB"))
        assert pixels.std() > 10, f"{path} is blank"


def test_det_figure_draws_the_curve_and_marks_the_eer():
    scores, target = synthetic_scores()
    values = scores["cos"].numpy()
    fnr, fpr = (t.numpy() for t in roc_points(values, target))
    metrics = compute_metrics(values, target)
    n_tar, n_non = int(target.sum()), int((~target).sum())
    fig = plots.det_figure("cosine", fnr, fpr, metrics, n_tar, n_non)
    ax = fig.axes[0]
    curve, _, eer_marker, _ = ax.lines
    assert np.array_equal(curve.get_xdata(), plots.det_points(fnr, fpr, 0.5 / max(n_tar, n_non))[0])
    assert np.allclose(eer_marker.get_xydata()[0], plots.probit([metrics["eer"]] * 2))
    assert "EER" in ax.get_legend().get_texts()[2].get_text()


@pytest.mark.parametrize("gap, high", [(10.0, 0.5), (0.0, 0.99)], ids=["perfect", "chance"])
def test_det_axes_keep_perfect_and_chance_curves_in_view(gap, high):
    rng = np.random.default_rng(1)
    target = np.r_[np.ones(50, bool), np.zeros(200, bool)]
    values = (rng.normal(size=250) + gap * target).astype(np.float32)
    fnr, fpr = (t.numpy() for t in roc_points(values, target))
    ax = plots.det_figure("x", fnr, fpr, compute_metrics(values, target), 50, 200).axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert np.isclose(x1, plots.probit(high)) and np.isclose(y1, plots.probit(high))
    curve = ax.lines[0].get_xydata()
    assert (curve[:, 0] >= x0 - 1e-9).all() and (curve[:, 1] >= y0 - 1e-9).all()  # zero rates on the edges
    assert ((curve[:, 0] < x1) & (curve[:, 1] < y1)).any()


@pytest.fixture(scope="module")
def image_eval_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_eval")
    data = make_image_tree(str(root / "test"), n_classes=3, per_class=8)
    return data, write_checkpoint(str(root / "cp.pt"))


def test_eval_plot_writes_pngs_beside_scores_and_json(image_eval_inputs, tmp_path):
    """eval.py as a person runs it (a terminal): progress bars, the table, score file, JSON and six PNGs."""
    data, cp = image_eval_inputs
    out = str(tmp_path / "scores.out")
    argv = ["--data-path", data, "--cp-path", cp, "--out-path", out, "--plot", "--device", "cpu"]
    status, stdout, terminal = run_on_terminal([sys.executable, os.path.join(ROOT, "eval.py"), *argv])
    assert status == 0, terminal.decode(errors="replace")
    names = set(os.listdir(tmp_path))
    pngs = {f"scores.out.{s}_{kind}.png" for s in SCORERS for kind in ("det", "hist")}
    assert names == {"scores.out", "scores.out.json"} | pngs
    summary = json.load(open(out + ".json"))
    assert summary["trials"] == 24 * 23 // 2 and set(summary["metrics"]) == set(SCORERS)
    assert "plots: " in stdout and "mindcf_0.01" in stdout
    assert b"embedding" in terminal and b"scoring pairs" in terminal  # tqdm bars, drawn on a terminal only


def test_eval_plot_on_speech_trials(tmp_path, capsys):
    """The speech path (Kaldi features + trials) writes the same PNGs and JSON beside its score file."""
    kaldi = str(tmp_path / "kaldi")
    write_kaldi_dir(kaldi, n_speakers=3, n_utts=3, ncoef=23)
    cp = write_checkpoint(str(tmp_path / "tdnn.pt"), "TDNN", 3, {"ncoef": 23, "latent_size": 16})
    out = str(tmp_path / "out" / "scores.out")
    os.makedirs(os.path.dirname(out))
    argv = ["--cp-path", cp, "--test-data", kaldi, "--trials-path", kaldi + "/trials", "--out-path", out, "--plot"]
    assert eval_script.main([*argv, "--device", "cpu"]) == 0
    pngs = {f"scores.out.{s}_{kind}.png" for s in SCORERS for kind in ("det", "hist")}
    assert set(os.listdir(os.path.dirname(out))) == {"scores.out", "scores.out.json"} | pngs
    assert json.load(open(out + ".json"))["trials"] == 36
    assert "plots: " in capsys.readouterr().out
