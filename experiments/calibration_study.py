"""Calibration studies of the benches: development and test trial sets, calibration fitted on one and
measured on the other, and the table of how close actual costs come to the minimum.

A library for experiments/speech_backends.py and experiments/image_calibration.py, not a command: run directly, it says
so and exits with status 2.
"""

import os
import re
import statistics
import sys

import numpy as np

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from benchlib import make_parser, mean_sd  # noqa: E402

from e2e_verification.calibration import apply_calibration, fit_calibration  # noqa: E402
from e2e_verification.metrics import act_dcf, cllr, compute_eer, compute_mindcf  # noqa: E402
from utils import UserError, cli  # noqa: E402

EXAMPLE = """examples (the benches this library serves; it has no flags of its own):
  python experiments/calibration_study.py --help
  python experiments/speech_backends.py --runs runs/keep/tdnn --variant concat --folds 0-6 --out runs/backends.md
  python experiments/image_calibration.py --runs runs/keep/fmnist --protocol fmnist-open \\
      --out docs/results/fmnist_llr.md"""

CHECKPOINT = re.compile(r"checkpoint_(\d+)ep\.pt")
FUSION = ("e2e_logit", "cos")  # the fusion every study fits beside the scorers calibrated alone


def last_checkpoint(run):
    """The run folder's final checkpoint: the highest `cp/checkpoint_<N>ep.pt`."""
    folder = os.path.join(run, "cp")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    epochs = [int(m.group(1)) for m in map(CHECKPOINT.fullmatch, names) if m]
    if not epochs:
        raise UserError(f"no checkpoint_<N>ep.pt in {folder}")
    return os.path.join(folder, f"checkpoint_{max(epochs)}ep.pt")


def alternating_halves(groups):
    """{item: 0 or 1}: the items of each group ({group: [items]}), in sorted order, alternate between halves."""
    return {item: i % 2 for items in groups.values() for i, item in enumerate(sorted(items))}


def half_sets(name, trials, side):
    """(set name, development trials, test trials) twice: the trials within each half of the items, calibrated
    on the trials within the other half (trials across the halves are left out). `side`: (n, 2), the half
    (0 or 1) of each trial's enrollment and test item."""
    for half in (0, 1):
        inside, other = (side == half).all(1), (side == 1 - half).all(1)
        yield f"{name} half {half}", subset(trials, other), subset(trials, inside)


def subset(trials, keep):
    """(columns, labels) of the trials where `keep` is true."""
    columns, labels = trials
    return {name: values[keep] for name, values in columns.items()}, labels[keep]


def pooled(trial_sets):
    """(columns, labels) of several score files' trials together."""
    names = trial_sets[0][0]
    columns = {name: np.concatenate([t[0][name] for t in trial_sets]) for name in names}
    return columns, np.concatenate([t[1] for t in trial_sets])


def threshold_at_mindcf(llr, labels, p_target):
    """The threshold (accept llr >= it) of the lowest detection cost on these trials; inf: reject all."""
    order = np.argsort(-llr, kind="stable")
    ranked, targets = llr[order], labels[order]
    n_tar, n_non = int(targets.sum()), int((~targets).sum())
    # Accepting the k best-scored trials, k = 0..n; only cuts between distinct scores are thresholds.
    p_miss = 1.0 - np.concatenate([[0], np.cumsum(targets)]) / n_tar
    p_fa = np.concatenate([[0], np.cumsum(~targets)]) / n_non
    cost = p_target * p_miss + (1.0 - p_target) * p_fa
    cut = np.concatenate([[True], ranked[1:] != ranked[:-1], [True]])
    k = int(np.flatnonzero(cut)[np.argmin(cost[cut])])
    return np.inf if k == 0 else float(ranked[k - 1])


def dcf_at_threshold(llr, labels, threshold, p_target):
    """Normalised detection cost of accepting the trials with llr >= threshold."""
    return act_dcf(llr - threshold + np.log((1.0 - p_target) / p_target), labels, p_target)


def costs(llr, labels, dev_llr, dev_labels, p_target):
    """{min_dcf, act_dcf, cllr} of LLRs on their trials, and "dev_threshold_dcf": their cost at the threshold
    that is best on the development LLRs (how far the best decision on those trials carries to these)."""
    threshold = threshold_at_mindcf(dev_llr, dev_labels, p_target)
    return {
        "min_dcf": compute_mindcf(llr, labels, p_target),
        "act_dcf": act_dcf(llr, labels, p_target),
        "cllr": cllr(llr, labels),
        "dev_threshold_dcf": dcf_at_threshold(llr, labels, threshold, p_target),
    }


def calibrated_metrics(dev, test, p_target, scorers):
    """Calibrate `scorers` alone and FUSED together on `dev`; -> {cal_<name>: EER and costs on `test`}."""
    params = fit_calibration(*dev, p_target, fusions=[list(FUSION)], scorers=list(scorers))
    dev_llrs = apply_calibration(params, dev[0])
    return {
        name: {"eer": compute_eer(llr, test[1]), **costs(llr, test[1], dev_llrs[name], dev[1], p_target)}
        for name, llr in apply_calibration(params, test[0]).items()
    }


def within_10_percent(ratios):
    """'k of n': how many cost ratios (actual / minimum) are at most 1.1."""
    return f"{sum(ratio <= 1.1 for ratio in ratios)} of {len(ratios)}"


def calibration_table(results, p_target, group="development data"):
    """Markdown: a row per (group of test sets, scorer): test sets, means and the counts within 10 %.

    results: {group: {test set: {scorer: costs}}} (costs as calibrated_metrics's)."""
    lines = [
        f"| {group} | scorer | test sets | minDCF({p_target:g}) | actDCF({p_target:g}) | Cllr "
        "| actDCF / minDCF | within 10 % | DCF at the development set's best threshold | within 10 % |",
        "|---" * 10 + "|",
    ]
    for protocol, sets in results.items():
        for scorer in next(iter(sets.values())):
            rows = [m[scorer] for m in sets.values()]
            ratios = [r["act_dcf"] / r["min_dcf"] for r in rows]
            cells = [mean_sd([r[key] for r in rows]) for key in ("min_dcf", "act_dcf", "cllr")]
            best = [r["dev_threshold_dcf"] for r in rows]
            lines.append(
                f"| {protocol} | {scorer} | {len(rows)} | " + " | ".join(cells)
                + f" | {statistics.mean(ratios):.2f} | {within_10_percent(ratios)} | {mean_sd(best)}"
                + f" | {within_10_percent([b / r['min_dcf'] for b, r in zip(best, rows)])} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser():
    """A parser with no flags: --help shows what the module is; anything else is refused."""
    return make_parser(__doc__, EXAMPLE)


def main(argv=None):
    build_parser().parse_args(argv)
    raise UserError(
        "this is a library of the calibration benches, not a command: run experiments/speech_backends.py or "
        "experiments/image_calibration.py"
    )


if __name__ == "__main__":
    cli(main)
