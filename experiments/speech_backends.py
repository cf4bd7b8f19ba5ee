"""Speech back-ends on the Asterisk folds: PLDA, S-norm / AS-norm, and calibration from other data.

Reads the Asterisk runs that experiments/accuracy.py kept (--keep-dir): each fold's checkpoint, and the
fold's features under --work-dir. For every fold it embeds the training speakers' utterances (the
score-normalisation cohort and the PLDA training set), trains PLDA, and scores the fold's test trials
with every scorer (eval.py --cohort --plda). Then it calibrates (prior-weighted logistic regression at
--p-target, default 0.01, calibration.fit_calibration, as calibrate.py) each fold's scores on development scores
of each --dev protocol:
  next    the next fold's score file (another model, two other speakers), as in calibrating a recipe
          on another run of it;
  others  the pooled score files of every other fold (six models, six other speaker pairs);
  halves  the same fold: each held-out speaker's utterances alternate between two halves, the trials
          within one half are calibrated on the trials within the other (same model and speakers,
          disjoint utterances): what calibration misses when development data match the test.
Prints, mean +- sd over folds, EER, minDCF(0.01), actDCF(0.01) and Cllr of every scorer, then for each
protocol and calibrated scorer the mean actDCF / minDCF at --p-target and how many test sets have their
actDCF within 10 % of their minDCF.
"""

import os
import sys

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import calibration_study as study  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import at_least, mean_sd, metrics_of, python  # noqa: E402

from e2e_verification import speech_data  # noqa: E402
from e2e_verification.calibration import read_score_file  # noqa: E402
from utils import UserError, cli  # noqa: E402

EXAMPLE = """example:
  python experiments/accuracy.py --protocols asterisk --variants concat --folds 0-6 --keep-dir runs/keep/tdnn
  python experiments/speech_backends.py --runs runs/keep/tdnn --variant concat --folds 0-6 --out runs/backends.md"""
DEV_PROTOCOLS = ("next", "others", "halves")
CALIBRATED = ("cos", "asnorm_cos", "e2e_logit")  # calibrated alone; and fused: study.FUSION
COLUMNS = (("EER", "eer"), ("minDCF(0.01)", "mindcf_0.01"), ("actDCF(0.01)", "act_dcf_0.01"), ("Cllr", "cllr"))


def fold_paths(args, fold):
    """(the fold's data folder, its kept run folder, the run's final checkpoint)."""
    data = os.path.join(args.work_dir, f"asterisk_fold{fold}")
    run = os.path.join(args.runs, f"asterisk_{args.variant}_{fold}")
    return data, run, study.last_checkpoint(run)


def score(args, paths, out):
    """eval.py on the fold's test trials with the cohort and PLDA back-ends; -> metrics of every scorer."""
    data, run, cp = paths
    embeddings = os.path.join(run, "train_embeddings")
    python("eval.py", "--test-data", f"{data}/test_feats/feats.scp", "--trials-path", f"{data}/test/trials",
           "--cp-path", cp, "--device", "cpu", "--cohort", os.path.join(embeddings, "embeddings.h5"),
           "--plda", os.path.join(run, "plda.json"), "--out-path", out, threads=args.threads)  # fmt: skip
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
    lines = ["| scorer | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * 5 + "|"]
    for scorer in scorers:
        cells = []
        for _, key in COLUMNS:
            values = [m[scorer][key] for m in per_fold if key in m[scorer]]
            cells.append(mean_sd(values) if len(values) == len(per_fold) else "")
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(record):
    """Markdown: the scorers' table over the folds, then the calibration table."""
    runs = record["runs"]
    return (
        table(list(runs["folds"].values()))
        + "\n"
        + study.calibration_table(runs["calibration"], record["args"]["p_target"])
    )


def utterance_halves(utt2spk):
    """{utt: 0 or 1}: each speaker's utterances, in sorted order, alternate between half 0 and half 1."""
    return study.alternating_halves(speech_data.speaker_info(utt2spk_path=utt2spk)[0])


def calibration_sets(protocol, folds, scores, halves):
    """(test-set name, development trials, test trials) of each calibration `protocol` makes.

    scores: {fold: (columns, labels, enroll, test)} of the first pass; halves: {fold: utterance_halves}.
    """
    for i, fold in enumerate(folds):
        trials = scores[fold][:2]
        if protocol == "next":
            dev = folds[(i + 1) % len(folds)]
            yield f"fold {fold} on fold {dev}", scores[dev][:2], trials
        elif protocol == "others":
            yield f"fold {fold} on the others", study.pooled([scores[f][:2] for f in folds if f != fold]), trials
        else:
            enroll, test = scores[fold][2:]
            side = np.array([[halves[fold][e], halves[fold][t]] for e, t in zip(enroll, test)])
            yield from study.half_sets(f"fold {fold}", trials, side)


OPTIONS = {
    "--runs": dict(required=True, help="experiments/accuracy.py --keep-dir of the Asterisk runs"),
    "--variant": dict(default="concat", help="the runs' learned-distance variant (default concat)"),
    "--folds": (benchlib.asterisk_folds, "0-6", "folds to use, 0..6, at least two (default 0-6)"),
    "--dev": (
        benchlib.name_list(DEV_PROTOCOLS, "development protocol"),
        ",".join(DEV_PROTOCOLS),
        "development data of the calibration, comma-separated, from: " + ", ".join(DEV_PROTOCOLS) + " (default all)",
    ),  # fmt: skip
    "--p-target": (benchlib.prior, 0.01, "target prior of the calibration and its costs (default 0.01)"),
    "--work-dir": dict(default="runs/accuracy", help="the folds' data (experiments/accuracy.py --work-dir)"),
    "--lda-dim": (at_least(0), 0, "PLDA's LDA size (default 0: no LDA)"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.RUN_THREADS, benchlib.out_table("speech_backends"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    folds, protocols = args.folds, args.dev
    if len(folds) < 2 and set(protocols) - {"halves"}:
        raise UserError("--folds needs at least two folds to calibrate one on another")
    paths = {fold: fold_paths(args, fold) for fold in folds}
    per_fold, scores = [], {}
    for fold in folds:
        prepare(args, paths[fold])
        out = os.path.join(paths[fold][1], "backend_scores.out")
        per_fold.append(score(args, paths[fold], out))
        scores[fold] = read_score_file(out)
    halves = {fold: utterance_halves(os.path.join(paths[fold][0], "test", "utt2spk")) for fold in folds}
    results = {}
    for protocol in protocols:
        results[protocol] = {}
        for name, dev, test in calibration_sets(protocol, folds, scores, halves):
            results[protocol][name] = metrics = study.calibrated_metrics(dev, test, args.p_target, CALIBRATED)
            pairs = (f"{s} {m['act_dcf']:.3f}/{m['min_dcf']:.3f}" for s, m in metrics.items())
            print(f"{protocol}: {name}: actDCF/minDCF " + "  ".join(pairs), flush=True)
    runs = {"folds": dict(zip(map(str, folds), per_fold)), "calibration": results}
    benchlib.publish(__file__, argv, args, runs, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
