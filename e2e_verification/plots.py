"""Pictures of a trial list: a DET curve and target / non-target score histograms for each scorer (PNG).

Drawn with matplotlib's object interface (no pyplot, no display needed, Agg renders the PNG) and
written atomically beside the score file: `<scores>.<scorer>_det.png` and `<scores>.<scorer>_hist.png`.
"""

import numpy as np
import torch
from matplotlib.figure import Figure

from e2e_verification.metrics import compute_metrics, roc_points
from utils import atomic_path

DET_TICKS = (1e-5, 1e-4, 1e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
DET_STEP = 0.005  # keep a DET point once the curve moved this far (normal deviates): a few thousand at most
P_TARGET = 0.01  # operating point marked on the DET curve (the minDCF of the metrics file)


def probit(p):
    """Normal deviates of probabilities, clipped inside (0, 1): the axis scale of a DET plot."""
    p = torch.as_tensor(np.asarray(p, dtype=np.float64)).clamp(1e-7, 1 - 1e-7)
    return torch.special.ndtri(p).numpy()


def det_points(fnr, fpr, floor=DET_TICKS[0]):
    """Thin a DET staircase to the points where it moves at least DET_STEP: -> (x = probit fpr, y = probit fnr).

    Rates below `floor` (zero included) are drawn at `floor`, the plot's lower edges, so a curve with
    no errors on one side runs along that edge instead of vanishing off the plot.
    """
    x, y = probit(np.maximum(fpr, floor)), probit(np.maximum(fnr, floor))
    cells = np.stack([np.round(x / DET_STEP), np.round(y / DET_STEP)], 1)
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = (cells[1:] != cells[:-1]).any(1)
    keep[-1] = True
    return x[keep], y[keep]


def eer_threshold(scores, fnr, fpr):
    """The score at the EER point of `roc_points` (accept scores >= it); `scores` a float array."""
    distinct = np.unique(scores)[::-1]
    assert len(distinct) + 1 == len(fnr), "roc_points gives one point per distinct score plus one"
    k = int(np.argmin(np.abs(fnr - fpr)))
    return float(distinct[max(k - 1, 0)])


def det_figure(name, fnr, fpr, metrics, n_tar, n_non):
    """DET curve (miss vs false-alarm rate on normal-deviate axes) with the EER and minDCF points marked."""
    fig = Figure(figsize=(6, 6), dpi=100)
    ax = fig.subplots()
    low = max(min(1.0 / n_tar, 1.0 / n_non) / 2, DET_TICKS[0])
    high = 0.5 if metrics["eer"] < 0.25 else 0.99  # show weak scorers whole, not just their corner
    ticks = [t for t in DET_TICKS if low <= t <= high]
    ax.plot(*det_points(fnr, fpr, low), color="tab:blue", lw=1.8, label=name)
    ax.plot(probit([low, high]), probit([low, high]), color="0.6", lw=0.8, ls="--", label="miss = false alarm")
    eer = metrics["eer"]
    ax.plot(*probit([max(eer, low)] * 2), "o", color="tab:red", label=f"EER {100 * eer:.2f}%")
    k = int(np.argmin(P_TARGET * fnr + (1 - P_TARGET) * fpr))
    key = f"mindcf_{P_TARGET:g}"
    label = f"minDCF(p={P_TARGET:g}) {metrics[key]:.3f}" if key in metrics else f"min cost at p={P_TARGET:g}"
    ax.plot(*probit([max(fpr[k], low), max(fnr[k], low)]), "s", color="tab:green", label=label)
    if eer == 0:
        ax.text(0.5, 0.5, "no errors: every target outscores\nevery non-target", transform=ax.transAxes, ha="center")
    labels = [f"{100 * t:g}" for t in ticks]
    ax.set_xticks(probit(ticks), labels)
    ax.set_yticks(probit(ticks), labels)
    ax.set_xlim(*probit([low, high]))
    ax.set_ylim(*probit([low, high]))
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(f"DET: {name}\n{n_tar} target / {n_non} non-target trials", fontsize=10)
    ax.grid(True, color="0.85", lw=0.6)
    ax.legend(loc="lower left", fontsize=8)  # the corner a DET curve never enters, bar a perfect one
    fig.tight_layout()
    return fig


def histogram_figure(name, scores, target, threshold):
    """Target and non-target score densities on shared bins, with the EER threshold as a vertical line."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    edges = np.linspace(float(scores.min()), float(scores.max()), 61)
    if edges[0] == edges[-1]:
        edges = np.linspace(edges[0] - 0.5, edges[0] + 0.5, 61)
    for mask, label, color in ((~target, "non-target", "tab:orange"), (target, "target", "tab:blue")):
        ax.hist(scores[mask], bins=edges, density=True, alpha=0.55, color=color, label=f"{label} ({mask.sum()})")
    ax.axvline(threshold, color="tab:red", ls="--", lw=1.2, label=f"EER threshold {threshold:.3f}")
    ax.set_xlabel("score")
    ax.set_ylabel("density (each class sums to 1)")
    ax.set_title(f"Scores: {name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_png(fig, path):
    """Render a figure to `path` through a temporary file in the same folder."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_plots(prefix, scores, target, metrics=None, titles=None):
    """For each scorer of {scorer: scores (trials,)}, write `<prefix>.<scorer>_det.png` and `_hist.png`.

    `target` is a (trials,) bool array or tensor; `metrics` ({scorer: {eer, mindcf_*}}) is recomputed
    when not given; `titles` ({scorer: title}, e.g. from scoring's Scorer.title) names the curves, else
    the scorer's name does. Returns the written paths.
    """
    target = np.asarray(target.detach().cpu() if torch.is_tensor(target) else target, dtype=bool)
    n_tar, n_non = int(target.sum()), int((~target).sum())
    written = []
    for scorer, values in scores.items():
        values = values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
        fnr, fpr = (t.numpy() for t in roc_points(values, target))
        stats = metrics[scorer] if metrics else compute_metrics(values, target)
        name = (titles or {}).get(scorer) or scorer
        det = f"{prefix}.{scorer}_det.png"
        save_png(det_figure(name, fnr, fpr, stats, n_tar, n_non), det)
        hist = f"{prefix}.{scorer}_hist.png"
        save_png(histogram_figure(name, values, target, eer_threshold(values, fnr, fpr)), hist)
        written += [det, hist]
    return written
