"""The digits demo as a user runs it (`python train.py`, no flags but the checkpoint folder and the seed), over
seeds: the table it prints (EER, minDCF at 0.01 and 0.05, AUC of e2e, cosine and fused scores on all pairs of
the held-out digits), with the thread count the toolkit chooses on this machine.

The README's first command prints the seed-1 row; runs are deterministic on one machine and thread count, and
another CPU, PyTorch build or thread count rounds differently.
"""

import os
import sys
import tempfile

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
from benchlib import SEEDS_OPTION, metrics_of  # noqa: E402

from utils import cli  # noqa: E402

EXAMPLE = """example:
  python experiments/digits_demo.py --seeds 1,2,3"""
SCORERS = ("e2e", "cos", "fus")
METRICS = ("eer", "mindcf_0.01", "mindcf_0.05", "auc")


def render(record):
    """Markdown: one row per (seed, scorer), the demo's printed columns."""
    lines = ["| seed | scorer | " + " | ".join(METRICS) + " |", "|" + "---|" * (2 + len(METRICS))]
    for run in record["runs"]:
        for scorer in SCORERS:
            cells = " | ".join(f"{run['metrics'][scorer][m]:.4f}" for m in METRICS)
            lines.append(f"| {run['seed']} | {scorer} | {cells} |")
    return "\n".join(lines) + "\n"


def demo(seed):
    """The demo's metrics for `seed`, run as `python train.py` (no thread override)."""
    with tempfile.TemporaryDirectory() as folder:
        cp = os.path.join(folder, "digits")
        benchlib.python("train.py", "--seed", str(seed), "--checkpoint-path", cp, "--verbose", "0", threads=None)
        return metrics_of(os.path.join(cp, "test_scores.txt.json"))


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, SEEDS_OPTION, benchlib.out_table("digits_demo"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = []
    for seed in args.seeds:
        runs.append({"seed": seed, "metrics": demo(seed)})
        print(f"seed {seed}: " + "  ".join(f"{s} {runs[-1]['metrics'][s]['eer']:.4f}" for s in SCORERS), flush=True)
    benchlib.publish(__file__, argv, args, runs, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
