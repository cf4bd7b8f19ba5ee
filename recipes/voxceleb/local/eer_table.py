"""The VoxCeleb recipe's results: EER (%) per trial list (rows) and scorer (columns), as a Markdown table.

Reads the score files the recipe's stages 6-8 wrote for the union of the lists (<model dir>/scores/) and the
lists themselves (<exp>/data/trials/), and computes each list's EER from its own trials; a scorer whose stage
has not run is shown as `-`. One table for <exp> and, when stage 10 ran, one for <exp>/lm (the large-margin
fine-tuned model).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from e2e_verification import speech_data
from e2e_verification.calibration import read_scores
from e2e_verification.metrics import compute_eer
from utils import UserError, cli, make_parser

ROWS = {  # trials file of stage 1 -> row name
    "vox1_O": "Vox1-O",
    "vox1_O_cleaned": "Vox1-O-clean",
    "vox1_E_cleaned": "Vox1-E-clean",
    "vox1_H_cleaned": "Vox1-H-clean",
}
COLUMNS = (  # (title, score file of the stage, column)
    ("cosine", "vox1_all.score", "cos"),
    ("e2e", "vox1_all.score", "e2e"),
    ("fused", "vox1_all.score", "fus"),
    ("AS-norm cos", "vox1_all.asnorm.score", "asnorm_cos"),
    ("AS-norm e2e", "vox1_all.asnorm.score", "asnorm_e2e_logit"),
    ("cal. fused", "vox1_all.calibrated.score", "cal_e2e_logit+cos"),
)


def load_columns(scores_dir):
    """{(file, column): {(enroll, test): score}} of the score files present in `scores_dir`."""
    found = {}
    for name in sorted({file for _, file, _ in COLUMNS}):
        path = os.path.join(scores_dir, name)
        if not os.path.isfile(path):
            continue
        scores = read_scores(path, [c for _, f, c in COLUMNS if f == name], ids=True)
        for column, values in scores.columns.items():
            found[name, column] = dict(zip(zip(scores.enroll, scores.test), values))
    return found


def list_eer(by_pair, trials, name):
    """The EER of one list's trials (enroll, test, target) read from {(enroll, test): score}."""
    enroll, test, target = trials
    try:
        scores = np.array([by_pair[pair] for pair in zip(enroll, test)])
    except KeyError as err:
        raise UserError(f"the score files miss the trial {' '.join(err.args[0])} of {name}") from None
    return compute_eer(scores, target)


def table(trials_dir, scores_dir, title):
    """The Markdown EER table of one model folder's scores, or None when it holds none."""
    found = load_columns(scores_dir)
    if not found:
        return None
    lines = [f"### {title}", "", "| trials | " + " | ".join(t for t, _, _ in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in ROWS.items():
        trials = speech_data.read_trials(os.path.join(trials_dir, name))
        cells = [f"{100 * list_eer(found[f, c], trials, name):.2f}" if (f, c) in found else "-" for _, f, c in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EXAMPLE = "example:\n  python recipes/voxceleb/local/eer_table.py --exp exp/voxceleb"


def main(argv=None):
    args = make_parser(__doc__, EXAMPLE, {"--exp": dict(required=True, help="the recipe's --exp folder")}).parse_args(
        argv
    )
    trials_dir = os.path.join(args.exp, "data", "trials")
    models = (("averaged model", args.exp), ("large-margin fine-tuned", os.path.join(args.exp, "lm")))
    tables = [table(trials_dir, os.path.join(folder, "scores"), f"EER (%): {title}") for title, folder in models]
    tables = [t for t in tables if t is not None]
    if not tables:
        raise UserError(f"no score files under {args.exp}/scores: run stages 6-8 first")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    cli(main)
