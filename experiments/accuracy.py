"""The results table: each open-set protocol x learned-distance variant, several seeds or folds each.

Every cell trains with train.py and scores the protocol's test trials with eval.py (or the digits
demo's own test), in subprocesses, and reports mean +- sd over the runs of EER and minDCF(0.01)
for the learned distance (e2e), cosine and fused scores, with the CPU minutes the cell took.

Protocols (train classes -> test classes):
  digits-closed   scikit-learn digits, all 10 classes (the demo)
  digits-open     digits 0-4 -> 5-9 (validation on held-out digits 5-9)
  fmnist-open     Fashion-MNIST 0-4 -> 5-9, --items-per-class training images per class
  fmnist-closed   Fashion-MNIST, all classes, all 10,000 test images (49,995,000 trials)
  fonts           Debian fonts (tools/font_set.py): training fonts -> unseen font families
  asterisk        Asterisk voice prompts: 7 folds, each holding out 2 speakers (tools/asterisk_set.py --fold)
Variants: concat (the research code's [a; b] distance), sym ([Pa*Pb, |Pa-Pb|] on normalised
embeddings), concat-norm (concat on normalised embeddings), sym-detach (sym, pair loss not
trained into the encoder).
"""

import argparse
import contextlib
import os
import shlex
import sys
import tempfile

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
from benchlib import IMAGE_RECIPE, VARIANTS, at_least, children_cpu_seconds, mean_sd, metrics_of, name_list, python  # noqa: E402

from data_load import FASHION_DIR  # noqa: E402
from utils import cli  # noqa: E402

EXAMPLE = """examples:
  python experiments/accuracy.py --protocols digits-open,fonts --variants concat,sym --seeds 1,2,3
  python experiments/accuracy.py --protocols asterisk --variants concat,sym --folds 0-6"""

ROOT = benchlib.ROOT
SCORERS = ("e2e", "cos", "fus")
# The README's Asterisk run (TDNN, 8 epochs), its warmup scaled to the capped data (recipes/asterisk_tdnn.args).
SPEECH_RECIPE = benchlib.recipe("asterisk_tdnn")


def run_digits(folder, seed, variant, args, open_set):
    flags = ["--seed", str(seed), "--checkpoint-path", folder, "--verbose", "0", *VARIANTS[variant]]
    if open_set:
        flags += ["--classes", "0-4", "--valid-classes", "5-9"]
    python("train.py", *flags, threads=args.threads)
    return metrics_of(os.path.join(folder, "test_scores.txt.json"))


def train_and_eval_images(folder, seed, variant, args, train_flags, test_flags):
    cp = os.path.join(folder, "cp")
    flags = [*IMAGE_RECIPE, "--epochs", str(args.image_epochs), "--seed", str(seed), "--checkpoint-path", cp]
    python("train.py", *flags, *train_flags, "--verbose", "0", *VARIANTS[variant], threads=args.threads)
    out = os.path.join(folder, "scores.out")
    checkpoint = os.path.join(cp, f"checkpoint_{args.image_epochs}ep.pt")
    python("eval.py", "--cp-path", checkpoint, "--out-path", out, "--device", "cpu", *test_flags, threads=args.threads)
    return metrics_of(out + ".json")


def run_fmnist(folder, seed, variant, args, open_set):
    n = str(args.items_per_class)
    data = ["--data-path", FASHION_DIR, "--valid-data-path", FASHION_DIR, "--items-per-class", n]
    test = ["--data-path", FASHION_DIR]
    if open_set:
        data += ["--classes", "0-4", "--valid-classes", "5-9"]
        test += ["--classes", "5-9", "--items-per-class", str(args.test_items_per_class)]
    else:
        test.append("--no-score-file")  # 49,995,000 trials: the metrics JSON only, not a 2.3 GB score file
    return train_and_eval_images(folder, seed, variant, args, data, test)


def run_fonts(folder, seed, variant, args):
    fonts = args.fonts
    data = ["--data-path", f"{fonts}/train", "--valid-data-path", f"{fonts}/valid"]
    data += ["--items-per-class", str(args.items_per_class)] if args.items_per_class < 62 else []
    return train_and_eval_images(folder, seed, variant, args, data, ["--data-path", f"{fonts}/test"])


def asterisk_fold(args, fold):
    """Build (once, cached under --work-dir) the Asterisk fold's HDF5s and test features; -> folder."""
    out = os.path.join(args.work_dir, f"asterisk_fold{fold}")
    if os.path.isfile(os.path.join(out, "done")):
        return out
    # --force: a run killed after asterisk_set.py (no "done" yet) left its marked folder, to be built again
    python("tools/asterisk_set.py", "--out", out, "--fold", str(fold), "--seed", "0", "--no-floor", "--force",
           "--max-per-speaker", str(args.max_per_speaker), threads=args.threads)  # fmt: skip
    for part in ("train", "valid", "test"):
        python("data_prep.py", "--wav-scp", f"{out}/{part}/wav.scp", "--out-path", out, "--out-name", f"{part}.hdf",
               "--write-kaldi-feats", f"{out}/{part}_feats", threads=args.threads)  # fmt: skip
    open(os.path.join(out, "done"), "w").close()
    return out


def run_asterisk(folder, fold, variant, args):
    data = asterisk_fold(args, fold)
    cp = os.path.join(folder, "cp")
    flags = [*SPEECH_RECIPE, "--epochs", str(args.speech_epochs), "--seed", "1", "--checkpoint-path", cp]
    flags += ["--train-hdf-file", f"{data}/train.hdf", "--valid-hdf-file", f"{data}/valid.hdf"]
    flags += args.speech_flags
    python("train.py", *flags, "--verbose", "0", *VARIANTS[variant], threads=args.threads)
    out = os.path.join(folder, "scores.out")
    python("eval.py", "--test-data", f"{data}/test_feats/feats.scp", "--trials-path", f"{data}/test/trials",
           "--cp-path", os.path.join(cp, f"checkpoint_{args.speech_epochs}ep.pt"), "--out-path", out,
           "--device", "cpu", threads=args.threads)  # fmt: skip
    return metrics_of(out + ".json")


PROTOCOLS = {
    "digits-closed": lambda f, s, v, a: run_digits(f, s, v, a, open_set=False),
    "digits-open": lambda f, s, v, a: run_digits(f, s, v, a, open_set=True),
    "fmnist-open": lambda f, s, v, a: run_fmnist(f, s, v, a, open_set=True),
    "fmnist-closed": lambda f, s, v, a: run_fmnist(f, s, v, a, open_set=False),
    "fonts": run_fonts,
    "asterisk": run_asterisk,
}


def paired(runs, scorer):
    """'mean ± sd (wins/n)' of `scorer`'s EER minus cosine's, run by run (a win: not above cosine)."""
    diffs = [r[scorer]["eer"] - r["cos"]["eer"] for r in runs]
    wins = sum(d <= 0 for d in diffs)
    return f"{mean_sd(diffs)} ({wins}/{len(diffs)})"


def render(record):
    """Markdown: one row per (protocol, variant), mean ± sd over its runs, and the paired differences to cosine."""
    head = "| protocol | variant | runs | " + " | ".join(f"{s} EER" for s in SCORERS)
    head += " | e2e − cos (wins) | fus − cos (wins) | " + " | ".join(f"{s} minDCF(0.01)" for s in SCORERS)
    lines = [head + " | CPU min |", "|" + "---|" * (6 + 2 * len(SCORERS))]
    groups = {}
    for run in record["runs"]:
        groups.setdefault((run["protocol"], run["variant"]), []).append(run)
    for (protocol, variant), group in groups.items():
        runs = [r["metrics"] for r in group]
        cells = [mean_sd([r[s]["eer"] for r in runs]) for s in SCORERS]
        cells += [paired(runs, "e2e"), paired(runs, "fus")]
        cells += [mean_sd([r[s]["mindcf_0.01"] for r in runs]) for s in SCORERS]
        minutes = sum(r["cpu_s"] for r in group) / 60
        lines.append(f"| {protocol} | {variant} | {len(runs)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines) + "\n\n" + per_run(record["runs"])


# The per-run table's metrics, as eval.py's JSON names them, and their column titles.
RUN_METRICS = (("eer", "EER"), ("mindcf_0.01", "minDCF(0.01)"), ("mindcf_0.05", "minDCF(0.05)"), ("auc", "AUC"))


def per_run(runs):
    """Markdown: every run (seed or fold) on its own line, each scorer's metrics, for paired comparisons."""
    head = "| protocol | variant | seed or fold | " + " | ".join(f"{s} {t}" for _, t in RUN_METRICS for s in SCORERS)
    lines = [head + " |", "|" + "---|" * (3 + len(SCORERS) * len(RUN_METRICS))]
    for run in runs:
        cells = [f"{run['metrics'][s][key]:.4f}" for key, _ in RUN_METRICS for s in SCORERS]
        lines.append(f"| {run['protocol']} | {run['variant']} | {run['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_folder(args, name):
    """A run's folder: kept under --keep-dir when given, else a temporary one."""
    if args.keep_dir is None:
        return tempfile.TemporaryDirectory(dir=args.work_dir)
    folder = benchlib.make_folder(os.path.join(args.keep_dir, name), "--keep-dir")
    return contextlib.nullcontext(folder)


def shell_words(text):
    """An argparse type: flags split as a shell splits them -> a list."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} in {text!r}") from None


RUN_OPTIONS = {
    "--protocols": (
        name_list(PROTOCOLS, "protocol"),
        "digits-closed,digits-open",
        "comma-separated, from: " + ", ".join(PROTOCOLS),
    ),
    "--folds": (benchlib.asterisk_folds, "0-6", "Asterisk folds, 0..6 (default 0-6: every speaker held out twice)"),
}
IMAGE_OPTIONS = {
    "--image-epochs": (at_least(1), 10, "epochs of the image recipe (default 10)"),
    "--items-per-class": (at_least(2), 200, "training images per class (default 200)"),
    "--test-items-per-class": (at_least(2), 300, "open-set test images per class (300)"),
}
SPEECH_OPTIONS = {
    "--speech-epochs": (at_least(1), 8, "epochs of the Asterisk recipe (default 8)"),
    "--max-per-speaker": (at_least(2), 150, "Asterisk prompts per speaker (default 150)"),
    "--speech-flags": (
        shell_words,
        "",
        "more train.py flags for the Asterisk runs, e.g. '--model ECAPA_TDNN --specaug'",
    ),
}
FILE_OPTIONS = {
    "--work-dir": (str, "runs/accuracy", "cached data sets (default runs/accuracy)"),
    "--keep-dir": (str, None, "keep each run (checkpoint, scores) in DIR/<protocol>_<variant>_<run>"),
}


def build_parser():
    recipes = ("image recipe", IMAGE_OPTIONS), ("speech recipe", SPEECH_OPTIONS)
    files = {**FILE_OPTIONS, **benchlib.out_table("accuracy")}
    return benchlib.accuracy_parser(__doc__, EXAMPLE, RUN_OPTIONS, *recipes, files=files)


def main(argv=None):
    args = build_parser().parse_args(argv)
    benchlib.make_folder(args.work_dir, "--work-dir")
    if "fonts" in args.protocols:
        benchlib.make_font_set(args.fonts)
    every = []
    for protocol in args.protocols:
        for variant in args.variants:
            for key in args.folds if protocol == "asterisk" else args.seeds:
                start = children_cpu_seconds()
                with run_folder(args, f"{protocol}_{variant}_{key}") as folder:
                    metrics = PROTOCOLS[protocol](folder, key, variant, args)
                cpu = children_cpu_seconds() - start
                every.append({"protocol": protocol, "variant": variant, "run": key, "metrics": metrics, "cpu_s": cpu})
                line = "  ".join(f"{s} {metrics[s]['eer']:.4f}" for s in SCORERS)
                print(
                    f"{protocol} {variant} {'fold' if protocol == 'asterisk' else 'seed'} {key}: EER {line}", flush=True
                )
    benchlib.publish(__file__, argv, args, every, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
