"""Verification metrics from one sort (metrics.compute_metrics) against sklearn's roc_curve and a bare argsort.

compute_metrics returns the EER, minDCF at p_target 0.01 and 0.05 and the AUC of N scores; the
baselines are sklearn.metrics.roc_curve alone (what an EER computed through sklearn starts with)
and one bare argsort of the scores (numpy on the CPU, torch on a GPU), the floor of any
sort-based method. The scores are float32, 10% targets, drawn as two Gaussians.
"""

import benchlib
import numpy as np
import torch
from benchlib import at_least, seconds, speed_ratio  # noqa: E402
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
    **benchlib.out_perf("metric_speed"),
}
JSON_NAME = benchlib.perf_json("metric_speed")


def render(record):
    """Markdown: the rows of the performance table (what and command, ours, baseline, ratio), one per baseline."""
    lines = ["| what (command) | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in record["runs"]:
        what = f"EER + minDCF + AUC of {r['n']:,} float32 scores ({r['distinct']:,} distinct) — `{record['command']}`"
        ours = f"compute_metrics: {seconds(r['ours_s'])}"
        baseline = f"a bare {r['sort']} of the scores: {seconds(r['sort_s'])}"
        lines.append(f"| {what} | {ours} | {baseline} | {speed_ratio(r['sort_s'], r['ours_s'])} |")
        if r["roc_s"] is not None:
            baseline = f"`sklearn.metrics.roc_curve` + EER: {seconds(r['roc_s'])}"
            same = f"EER the same to {r['eer_diff']:.1e}"
            lines.append(f"| {what} | {ours} | {baseline} | {speed_ratio(r['roc_s'], r['ours_s'])} ({same}) |")
    return "\n".join(lines) + "\n"


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.DEVICE)


def measure(args, device):
    """Time compute_metrics, the bare argsort and roc_curve, print them; -> the run for the table."""
    rng = np.random.default_rng(0)
    labels = rng.random(args.n) < 0.1
    scores = (rng.standard_normal(args.n, dtype=np.float32) + 2.0 * labels).astype(np.float32)
    if args.decimals is not None:
        scores = np.round(scores, args.decimals)
    print(benchlib.describe(device))
    distinct = len(np.unique(scores))
    print(f"{args.n} float32 scores, {int(labels.sum())} targets, {distinct} distinct")
    if device.type == "cuda":
        s, y = torch.from_numpy(scores).to(device), torch.from_numpy(labels).to(device)
        sort_s, _ = benchlib.best_time(lambda: torch.argsort(s), device, args.repeats)
    else:
        s, y = scores, labels
        sort_s, _ = benchlib.best_time(lambda: np.argsort(scores), device, args.repeats)
    ours_s, metrics = benchlib.best_time(lambda: compute_metrics(s, y), device, args.repeats)
    print("compute_metrics: " + ", ".join(f"{k} {v:.6f}" for k, v in metrics.items()))
    print(benchlib.ratio_line("EER + minDCF + AUC", ours_s, "bare argsort", sort_s))
    sort = "`torch.argsort`" if device.type == "cuda" else "`numpy.argsort`"
    run = {"device": benchlib.describe(device), "n": args.n, "distinct": distinct, "eer": metrics["eer"]}
    run.update(ours_s=ours_s, sort=sort, sort_s=sort_s, roc_s=None, eer_diff=None)
    if args.no_sklearn:
        return run
    roc_s, eer = benchlib.best_time(lambda: sklearn_eer(scores, labels), torch.device("cpu"), 1, warmup=0)
    print(f"EER through roc_curve {eer:.6f} (|difference| {abs(eer - metrics['eer']):.1e})")
    print(benchlib.ratio_line("EER + minDCF + AUC", ours_s, "roc_curve + EER (CPU)", roc_s))
    return {**run, "roc_s": roc_s, "eer_diff": float(abs(eer - metrics["eer"]))}


def main(argv=None):
    args, device = benchlib.start(build_parser(), argv)
    if args.out:  # the JSON's folder, made before the work (the page's own folder is checked while parsing)
        benchlib.make_json_folder(args.out, JSON_NAME)
    benchlib.publish(__file__, argv, args, [measure(args, device)], render, args.out, JSON_NAME)
    return 0


if __name__ == "__main__":
    cli(main)
