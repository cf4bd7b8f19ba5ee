"""Verification metrics from one sort (metrics.compute_metrics) against sklearn's roc_curve and a bare argsort.

compute_metrics returns the EER, minDCF at p_target 0.01 and 0.05 and the AUC of N scores; the
baselines are sklearn.metrics.roc_curve alone (what an EER computed through sklearn starts with)
and one bare argsort of the scores (numpy on the CPU, torch on a GPU), the floor of any
sort-based method. The scores are float32, 10% targets, drawn as two Gaussians.
"""

import benchlib
import numpy as np
import torch
from benchlib import at_least
from sklearn.metrics import roc_curve

from e2e_verification.metrics import compute_metrics
from utils import cli

EXAMPLE = """example:
  python bench/metric_speed.py --device cpu --n 10000000
  python bench/metric_speed.py --device cuda --n 50000000 --no-sklearn"""


def sklearn_eer(scores, labels):
    """EER through roc_curve (the baseline, timed whole): the point where miss and false-alarm rates meet."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return (fnr[i] + fpr[i]) / 2


OPTIONS = {
    "--n": (at_least(10), 10_000_000, "scores, at least 10 (default 10,000,000)"),
    "--decimals": (at_least(0), None, "round the scores to this many decimals (ties)"),
    "--no-sklearn": ("skip the roc_curve baseline (slow for large N)",),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.DEVICE)


def main(argv=None):
    args, device = benchlib.start(build_parser(), argv)
    rng = np.random.default_rng(0)
    labels = rng.random(args.n) < 0.1
    scores = (rng.standard_normal(args.n, dtype=np.float32) + 2.0 * labels).astype(np.float32)
    if args.decimals is not None:
        scores = np.round(scores, args.decimals)
    print(benchlib.describe(device))
    print(f"{args.n} float32 scores, {int(labels.sum())} targets, {len(np.unique(scores))} distinct")
    if device.type == "cuda":
        s, y = torch.from_numpy(scores).to(device), torch.from_numpy(labels).to(device)
        sort_s, _ = benchlib.best_time(lambda: torch.argsort(s), device, args.repeats)
    else:
        s, y = scores, labels
        sort_s, _ = benchlib.best_time(lambda: np.argsort(scores), device, args.repeats)
    ours_s, metrics = benchlib.best_time(lambda: compute_metrics(s, y), device, args.repeats)
    print("compute_metrics: " + ", ".join(f"{k} {v:.6f}" for k, v in metrics.items()))
    print(benchlib.ratio_line("EER + minDCF + AUC", ours_s, "bare argsort", sort_s))
    if args.no_sklearn:
        return 0
    roc_s, eer = benchlib.best_time(lambda: sklearn_eer(scores, labels), torch.device("cpu"), 1, warmup=0)
    print(f"EER through roc_curve {eer:.6f} (|difference| {abs(eer - metrics['eer']):.1e})")
    print(benchlib.ratio_line("EER + minDCF + AUC", ours_s, "roc_curve + EER (CPU)", roc_s))
    return 0


if __name__ == "__main__":
    cli(main)
