"""Likelihood ratios on the Fashion-MNIST sets: the learned distance's raw logit beside calibrated scores.

Reads the Fashion-MNIST runs that experiments/accuracy.py kept (--keep-dir). For each run it scores the
protocol's test images again with eval.py (all pairs, into a compact .npz) and splits the images in two
halves, alternating in their order: the trials within one half are calibrated (cosine, e2e logit and
their fusion, prior-weighted at each --p-targets value, as calibrate.py) on the trials within the other;
trials across the halves are left out. Printed per prior and variant, mean +- sd over runs x halves:
minDCF, actDCF and Cllr of the raw e2e logit read as a log-likelihood ratio (the paper's claim: the
distance, trained on balanced pairs, outputs one) and of each calibrated scorer, with how many test
halves have actDCF within 10 % of minDCF. The development half is subsampled to --max-dev-trials for the
fit (the objective weighs targets and non-targets by the prior, not by their counts).
"""

import argparse
import os
import sys

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import calibration_study as study  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import SEEDS_OPTION, VARIANT_OPTION, at_least, python  # noqa: E402

from data_load import FASHION_DIR  # noqa: E402
from utils import cli  # noqa: E402

EXAMPLE = """example:
  python experiments/accuracy.py --protocols fmnist-open --variants concat,sym --seeds 1,2,3 --keep-dir runs/keep/fmnist
  python experiments/image_calibration.py --runs runs/keep/fmnist --protocol fmnist-open \\
      --out docs/results/fmnist_llr.md"""
SCORERS = ("cos", "e2e_logit")  # calibrated alone; and fused: study.FUSION


def test_flags(protocol, items_per_class):
    """eval.py's data flags for the protocol's test images (experiments/accuracy.py's Fashion-MNIST protocols)."""
    flags = ["--data-path", FASHION_DIR]
    if protocol == "fmnist-open":
        flags += ["--classes", "5-9", "--items-per-class", str(items_per_class)]
    return flags


def read_pairs(path):
    """eval.py's .npz: -> ({scorer: (P,) float64} of SCORERS, labels (P,) bool, enroll and test item indices)."""
    with np.load(path, allow_pickle=False) as data:
        columns = {name: data[name].astype(np.float64) for name in SCORERS}
        return columns, data["label"], data["enroll"], data["test"]


def at_most(trials, n, seed=0):
    """The trials, or a seeded random `n` of them."""
    count = len(trials[1])
    if count <= n:
        return trials
    return study.subset(trials, np.sort(np.random.default_rng(seed).choice(count, n, replace=False)))


def study_run(args, run, p_targets):
    """Score the run's test images again; -> {p_target: {"<run> half <h>": {scorer: costs}}}, both halves."""
    out = os.path.join(run, "pairs.npz")
    python("eval.py", "--cp-path", study.last_checkpoint(run), "--out-path", out, "--score-format", "npy",
           "--device", "cpu", *test_flags(args.protocol, args.test_items_per_class), threads=args.threads)  # fmt: skip
    columns, labels, enroll, test = read_pairs(out)
    os.remove(out)  # 0.6 GB for the closed set's 50 M pairs: the metrics JSON stays
    side = np.stack([enroll % 2, test % 2], 1)  # the images alternate between the halves
    results = {p: {} for p in p_targets}
    for name, dev, trials in study.half_sets(os.path.basename(run), (columns, labels), side):
        dev = at_most(dev, args.max_dev_trials)
        for p in p_targets:
            raw = study.costs(trials[0]["e2e_logit"], trials[1], dev[0]["e2e_logit"], dev[1], p)
            costs = {"e2e_logit (raw)": raw, **study.calibrated_metrics(dev, trials, p, SCORERS)}
            results[p][name] = costs
            print(f"{name}, p_target {p:g}: actDCF/minDCF " + "  ".join(
                f"{s} {m['act_dcf']:.3f}/{m['min_dcf']:.3f}" for s, m in costs.items()), flush=True)  # fmt: skip
    return results


def p_target_list(text):
    """An argparse type: --p-targets, comma-separated priors each strictly between 0 and 1 -> a list of floats."""
    try:
        return [benchlib.prior(p) for p in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err}, in {text!r}") from None


OPTIONS = {
    "--runs": dict(required=True, help="experiments/accuracy.py --keep-dir of the runs"),
    "--protocol": dict(choices=("fmnist-open", "fmnist-closed"), default="fmnist-open", help="(default fmnist-open)"),
    "--test-items-per-class": (at_least(2), 300, "fmnist-open: test images per class, as the runs' (default 300)"),
    "--p-targets": (
        p_target_list,
        "0.01,0.5",
        "target priors of the calibration and its costs, comma-separated, each in (0, 1) (0.01,0.5)",
    ),
    "--max-dev-trials": (
        at_least(1000),
        2_000_000,
        "development trials the calibration is fitted on, at most; at least 1000 (2000000)",
    ),
}


def render(record):
    """Markdown: a calibration table per target prior."""
    return "\n".join(study.calibration_table(record["runs"][str(p)], p, "variant") for p in record["args"]["p_targets"])


def build_parser():
    return benchlib.make_parser(
        __doc__,
        EXAMPLE,
        OPTIONS,
        SEEDS_OPTION,
        VARIANT_OPTION,
        benchlib.RUN_THREADS,
        benchlib.out_table("image_calibration"),
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    variants, seeds, p_targets = args.variants, args.seeds, args.p_targets
    runs = {v: [os.path.join(args.runs, f"{args.protocol}_{v}_{seed}") for seed in seeds] for v in variants}
    for run in (run for group in runs.values() for run in group):
        study.last_checkpoint(run)  # every run is there before the first is scored
    results = {p: {v: {} for v in variants} for p in p_targets}
    for variant, group in runs.items():
        for run in group:
            for p, sets in study_run(args, run, p_targets).items():
                results[p][variant].update(sets)
    benchlib.publish(__file__, argv, args, {str(p): results[p] for p in p_targets}, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
