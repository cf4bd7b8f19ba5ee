"""Speech back-ends on the Asterisk folds: PLDA, S-norm / AS-norm and calibration across folds.

Reads the Asterisk runs that bench/accuracy.py kept (--keep-dir): each fold's checkpoint, and the
fold's features under --work-dir. For every fold it embeds the training speakers' utterances (the
score-normalisation cohort and the PLDA training set), trains PLDA, and scores the fold's test trials
with every scorer (eval.py --cohort --plda). Then each fold is calibrated on another fold's scores
(fold k on fold k+1, cyclically: another model and other test speakers, as a user calibrates a
recipe on a development set) and scored again with the calibrated scorers. Prints, mean +- sd over
folds, EER, minDCF(0.01), actDCF(0.01) and Cllr of every scorer, and the mean ratio actDCF/minDCF.
"""

import os
import re
import statistics

import benchlib
from accuracy import mean_sd, metrics_of, python

from utils import UserError, cli

EXAMPLE = """example:
  python bench/accuracy.py --protocols asterisk --variants concat --folds 0-6 --keep-dir runs/keep/tdnn
  python bench/speech_backends.py --runs runs/keep/tdnn --variant concat --folds 0-6 --out runs/backends.md"""
CHECKPOINT = re.compile(r"checkpoint_(\d+)ep\.pt")
COLUMNS = (("EER", "eer"), ("minDCF(0.01)", "mindcf_0.01"), ("actDCF(0.01)", "act_dcf_0.01"), ("Cllr", "cllr"))


def fold_paths(args, fold):
    """(the fold's data folder, its kept run folder, the run's final checkpoint)."""
    data = os.path.join(args.work_dir, f"asterisk_fold{fold}")
    run = os.path.join(args.runs, f"asterisk_{args.variant}_{fold}")
    epochs = [int(m.group(1)) for m in map(CHECKPOINT.fullmatch, os.listdir(os.path.join(run, "cp"))) if m]
    if not epochs:
        raise UserError(f"no checkpoint_<N>ep.pt in {run}/cp")
    return data, run, os.path.join(run, "cp", f"checkpoint_{max(epochs)}ep.pt")


def score(args, paths, out, extra=()):
    """eval.py on the fold's test trials with the cohort and PLDA back-ends; -> metrics of every scorer."""
    data, run, cp = paths
    embeddings = os.path.join(run, "train_embeddings")
    python("eval.py", "--test-data", f"{data}/test_feats/feats.scp", "--trials-path", f"{data}/test/trials",
           "--cp-path", cp, "--device", "cpu", "--cohort", os.path.join(embeddings, "embeddings.h5"),
           "--plda", os.path.join(run, "plda.json"), "--out-path", out, *extra, threads=args.threads)  # fmt: skip
    return metrics_of(out + ".json")


def prepare(args, paths):
    """Embed the training speakers (tiled to eval.py's 100 frames, as the test items are) and train PLDA on
    them: the fold's back-end data."""
    data, run, cp = paths
    embeddings = os.path.join(run, "train_embeddings")
    python("embed.py", "--data", f"{data}/train_feats/feats.scp", "--utt2spk", f"{data}/train_feats/utt2spk",
           "--cp-path", cp, "--out-path", embeddings, "--device", "cpu", "--min-frames", "100",
           threads=args.threads)  # fmt: skip
    lda = ["--lda-dim", str(args.lda_dim)] if args.lda_dim else []
    python("train_plda.py", "--embeddings", embeddings, "--out", os.path.join(run, "plda.json"), *lda)


def table(per_fold):
    """Markdown: a row per scorer, mean +- sd over folds of each column present."""
    scorers = list(per_fold[0])
    lines = ["| scorer | " + " | ".join(name for name, _ in COLUMNS) + " | actDCF / minDCF |", "|---" * 6 + "|"]
    for scorer in scorers:
        cells = []
        for _, key in COLUMNS:
            values = [m[scorer][key] for m in per_fold if key in m[scorer]]
            cells.append(mean_sd(values) if len(values) == len(per_fold) else "")
        ratio = ""
        if all("act_dcf_0.01" in m[scorer] for m in per_fold):
            ratio = f"{statistics.mean(m[scorer]['act_dcf_0.01'] / m[scorer]['mindcf_0.01'] for m in per_fold):.2f}"
        lines.append(f"| {scorer} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


OPTIONS = {
    "--runs": dict(required=True, help="bench/accuracy.py --keep-dir of the Asterisk runs"),
    "--variant": dict(default="concat", help="the runs' learned-distance variant (default concat)"),
    "--folds": dict(default="0-6", help="folds to use, at least two (default 0-6)"),
    "--work-dir": dict(default="runs/accuracy", help="the folds' data (bench/accuracy.py --work-dir)"),
    "--lda-dim": (int, 0, "PLDA's LDA size (default 0: no LDA)"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.RUN_THREADS, benchlib.OUT_TABLE)


def main(argv=None):
    import data_load

    args = build_parser().parse_args(argv)
    folds = data_load.parse_classes(args.folds)
    if len(folds) < 2:
        raise UserError("--folds needs at least two folds: each is calibrated on another")
    paths = {fold: fold_paths(args, fold) for fold in folds}
    for fold in folds:
        prepare(args, paths[fold])
        score(args, paths[fold], os.path.join(paths[fold][1], "dev_scores.out"))
    per_fold = []
    for i, fold in enumerate(folds):
        dev_fold = folds[(i + 1) % len(folds)]
        dev_scores = os.path.join(paths[dev_fold][1], "dev_scores.out")
        calibration = os.path.join(paths[fold][1], f"calibration_from_fold{dev_fold}.json")
        python("calibrate.py", "--scores", dev_scores, "--out", calibration, threads=args.threads)
        out = os.path.join(paths[fold][1], "calibrated_scores.out")
        per_fold.append(score(args, paths[fold], out, ("--calibration", calibration)))
        print(f"fold {fold} (calibrated on fold {dev_fold}): " + "  ".join(
            f"{s} {m['eer']:.4f}" for s, m in per_fold[-1].items()), flush=True)  # fmt: skip
    benchlib.write_results(table(per_fold), dict(zip(map(str, folds), per_fold)), args.out)
    return 0


if __name__ == "__main__":
    cli(main)
