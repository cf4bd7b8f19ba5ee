"""The results table: one recipe and one learned-distance variant on every open-set protocol, several seeds
or folds each, with the checkpoint chosen and calibrated on held-out classes.

Every run trains with train.py (all epoch checkpoints kept), picks the epoch whose validation EER of
--select-by is lowest (the validation set holds classes that are neither trained on nor tested: digits and
Fashion-MNIST train on classes 0-4, validate on 5-6 and test on 7-9; the fonts validate on unseen fonts of the
training packages and test on unseen families; Asterisk validates on held-out prompts of its training speakers),
scores the protocol's test trials with eval.py and reports, per run: the EER, minDCF and AUC of the learned
distance (e2e), cosine and fused scores; Cllr, minCllr, actDCF and minDCF at priors 0.5 and 0.05 of the LLRs
calibrated by the checkpoint (fitted by train.py on its validation pairs); the validation learning curves.

Protocols (train classes -> test classes):
  digits-closed   scikit-learn digits, all 10 classes (the demo)
  digits-open     digits 0-4 -> 7-9 (validation on held-out digits 5-6)
  fmnist-open     Fashion-MNIST 0-4 -> 7-9 (validation on 5-6), --items-per-class training images per class
  fmnist-closed   Fashion-MNIST, all classes, all 10,000 test images (49,995,000 trials)
  fonts           Debian fonts (tools/font_set.py --valid-open): training fonts -> unseen font families
  asterisk        Asterisk voice prompts: 7 folds, each holding out 2 speakers (tools/asterisk_set.py --fold)
Variants: concat (the research code's [a; b] distance), sym ([Pa*Pb, |Pa-Pb|] on normalised
embeddings), cos (an affine map of the cosine plus a correction that starts at zero), concat-norm (concat on
normalised embeddings), sym-detach (sym, pair loss not trained into the encoder).
"""

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import VARIANTS, at_least, children_cpu_seconds, mean_sd, metrics_of, name_list, python  # noqa: E402

from data_load import FASHION_DIR, parse_classes  # noqa: E402
from e2e_verification import metrics as metric_fns  # noqa: E402
from e2e_verification.calibration import read_scores  # noqa: E402
from utils import UserError, cli, write_json  # noqa: E402

EXAMPLE = """examples:
  python experiments/accuracy.py --protocols digits-open,fmnist-open,fonts --variants concat,cos --seeds 1-3 \\
      --fonts runs/fonts16
  python experiments/accuracy.py --protocols asterisk --variants concat,cos --folds 0-6 \\
      --json-name accuracy_asterisk.json"""

ROOT = benchlib.ROOT
SCORERS = ("e2e", "cos", "fus")
# The priors of the calibration table: the checkpoint's calibration is fitted at 0.5 (train_loop).
LLR_PRIORS = (0.5, 0.05)
# The README's Asterisk run (TDNN, 8 epochs), its warmup scaled to the capped data (recipes/asterisk_tdnn.args).
SPEECH_RECIPE = benchlib.recipe("asterisk_tdnn")
# Open-set image protocols: train on 0-4, choose the checkpoint (and fit its calibration) on 5-6, test on 7-9
# (--open-split gives another split of the ten classes).
OPEN_SPLIT = {"train": "0-4", "valid": "5-6", "test": "7-9"}


def open_split(text):
    """--open-split TRAIN/VALID/TEST ('5-9/3-4/0-2'): three class lists of no shared class -> OPEN_SPLIT's form."""
    parts = text.split("/")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TRAIN/VALID/TEST class lists, e.g. 0-4/5-6/7-9")
    try:
        sets = [set(parse_classes(part)) for part in parts]
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if any(a & b for k, a in enumerate(sets) for b in sets[k + 1 :]):
        raise argparse.ArgumentTypeError(f"{text!r}: a class is in two of the three lists; they must be disjoint")
    return dict(zip(("train", "valid", "test"), parts))


def train(cp, flags, variant, args):
    """train.py with `flags`, every epoch's checkpoint kept in `cp`; with --reuse-kept, a run whose last epoch is
    there already is not trained again. Its CPU seconds are written beside `cp` (None when not measured)."""
    marker = os.path.join(os.path.dirname(cp), "trained.json")
    if args.reuse_kept and finished(cp):
        return
    start = children_cpu_seconds()
    python("train.py", *flags, "--checkpoint-path", cp, "--keep-checkpoints", "0", "--verbose", "0",
           *VARIANTS[variant], threads=args.threads)  # fmt: skip
    write_json(marker, {"cpu_s": children_cpu_seconds() - start})


def finished(cp):
    """Whether the run in `cp` trained all its epochs (args.json's --epochs has its checkpoint)."""
    try:
        with open(os.path.join(cp, "args.json")) as handle:
            epochs = json.load(handle)["epochs"]
    except (OSError, ValueError, KeyError):
        return False
    return os.path.isfile(os.path.join(cp, f"checkpoint_{epochs}ep.pt"))


def training_cpu(folder):
    """The CPU seconds train() measured for the run in `folder`, None when it was not measured."""
    try:
        with open(os.path.join(folder, "trained.json")) as handle:
            return json.load(handle)["cpu_s"]
    except (OSError, ValueError, KeyError):
        return None


def selected(cp, select_by):
    """(checkpoint path, its epoch, the validation EER curves) of the run's epoch chosen by `select_by`."""
    checkpoint, epoch, history = benchlib.chosen_checkpoint(cp, select_by)
    curves = {s: [round(v, 4) for v in history.get(f"{s}_eer", [])] for s in SCORERS}
    return checkpoint, epoch, curves


def llr_metrics(score_file):
    """{calibrated column: Cllr, minCllr, actDCF and minDCF at LLR_PRIORS} of the cal_* columns of a score file."""
    found = read_scores(score_file)
    out = {}
    for name, scores in found.columns.items():
        if name.startswith("cal_"):
            llr = metric_fns.llr_metrics(scores, found.labels, p_targets=LLR_PRIORS)
            roc = metric_fns.compute_metrics(scores, found.labels, p_targets=LLR_PRIORS)
            out[name] = {**llr, **{k: v for k, v in roc.items() if k == "eer" or k.startswith("mindcf")}}
    return out


def evaluate(folder, cp, test_flags, args):
    """Score the test trials with the selected checkpoint of `cp`: -> the run's record fields."""
    checkpoint, epoch, curves = selected(cp, args.select_by)
    out = os.path.join(folder, "scores.npz")
    start = children_cpu_seconds()
    python("eval.py", "--cp-path", checkpoint, "--out-path", out, "--score-format", "npy", "--device", "cpu",
           *test_flags, threads=args.threads)  # fmt: skip
    found = {"epoch": epoch, "valid": curves, "metrics": metrics_of(out + ".json"), "llr": llr_metrics(out)}
    train_s = training_cpu(folder)
    found["cpu_s"] = None if train_s is None else train_s + children_cpu_seconds() - start
    return found


def run_digits(folder, seed, variant, args, open_set):
    cp = os.path.join(folder, "cp")
    flags = ["--seed", str(seed)]
    test = []
    if open_set:
        split = args.open_split
        flags += ["--classes", split["train"], "--valid-classes", split["valid"], "--test-classes", split["test"]]
        test = ["--classes", split["test"]]
    train(cp, flags, variant, args)
    return evaluate(folder, cp, test, args)


def image_recipe(args, seed):
    return [*benchlib.recipe(args.image_recipe), "--epochs", str(args.image_epochs), "--seed", str(seed)]


def run_fmnist(folder, seed, variant, args, open_set):
    cp = os.path.join(folder, "cp")
    data = [
        "--data-path",
        FASHION_DIR,
        "--valid-data-path",
        FASHION_DIR,
        "--items-per-class",
        str(args.items_per_class),
    ]
    test = ["--data-path", FASHION_DIR]
    if open_set:
        data += ["--classes", args.open_split["train"], "--valid-classes", args.open_split["valid"]]
        test += ["--classes", args.open_split["test"], "--items-per-class", str(args.test_items_per_class)]
    train(cp, [*image_recipe(args, seed), *data], variant, args)
    return evaluate(folder, cp, test, args)


def run_fonts(folder, seed, variant, args):
    fonts, cp = args.fonts, os.path.join(folder, "cp")
    data = ["--data-path", f"{fonts}/train", "--valid-data-path", f"{fonts}/valid"]
    train(cp, [*image_recipe(args, seed), *data], variant, args)
    test = ["--data-path", f"{fonts}/test", "--items-per-class", str(args.font_test_items)]
    return evaluate(folder, cp, test, args)


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
    data, cp = asterisk_fold(args, fold), os.path.join(folder, "cp")
    flags = [*SPEECH_RECIPE, "--epochs", str(args.speech_epochs), "--seed", "1"]
    flags += ["--train-hdf-file", f"{data}/train.hdf", "--valid-hdf-file", f"{data}/valid.hdf", *args.speech_flags]
    train(cp, flags, variant, args)
    test = ["--test-data", f"{data}/test_feats/feats.scp", "--trials-path", f"{data}/test/trials"]
    return evaluate(folder, cp, test, args)


PROTOCOLS = {
    "digits-closed": lambda f, s, v, a: run_digits(f, s, v, a, open_set=False),
    "digits-open": lambda f, s, v, a: run_digits(f, s, v, a, open_set=True),
    "fmnist-open": lambda f, s, v, a: run_fmnist(f, s, v, a, open_set=True),
    "fmnist-closed": lambda f, s, v, a: run_fmnist(f, s, v, a, open_set=False),
    "fonts": run_fonts,
    "asterisk": run_asterisk,
}


def paired(runs, scorer):
    """'mean ± sd (wins/n, worst)' of `scorer`'s EER minus cosine's, run by run (a win: not above cosine; worst:
    the largest difference)."""
    diffs = [r[scorer]["eer"] - r["cos"]["eer"] for r in runs]
    wins = sum(d <= 0 for d in diffs)
    return f"{mean_sd(diffs)} ({wins}/{len(diffs)}, worst {max(diffs):+.4f})"


# The fusion calibrated by the checkpoint on its validation pairs (train_loop.CALIBRATED fused), a column of the
# score file; its EER is reported beside the fixed fusion's.
CAL_FUS = "cal_e2e_logit+cos"


def test_metrics(run):
    """A run's test metrics per scorer, with the checkpoint-calibrated fusion as `cal fus` when it was scored."""
    found = dict(run["metrics"])
    if CAL_FUS in run.get("llr", {}) and "eer" in run["llr"][CAL_FUS]:
        found["cal fus"] = run["llr"][CAL_FUS]
    return found


def groups_of(runs):
    """{(protocol, variant): [runs]} in the order the runs came."""
    groups = {}
    for run in runs:
        groups.setdefault((run["protocol"], run["variant"]), []).append(run)
    return groups


def render(record):
    """Markdown: the test table (mean ± sd over runs, paired differences to cosine), the calibration table, the
    held-out validation table, the learning curves and every run on its own line."""
    head = "| protocol | variant | runs | epoch | " + " | ".join(f"{s} EER" for s in (*SCORERS, "cal fus"))
    head += " | e2e − cos (wins, worst) | fus − cos (wins, worst) | cal fus − cos (wins, worst) | "
    lines = [head + " | ".join(f"{s} minDCF(0.01)" for s in SCORERS) + " | CPU min |", "|" + "---|" * 15]
    groups = groups_of(record["runs"])
    for (protocol, variant), group in groups.items():
        runs = [test_metrics(r) for r in group]
        calibrated = all("cal fus" in r for r in runs)
        cells = [f"{np.mean([r['epoch'] for r in group]):.1f}"]
        cells += [mean_sd([r[s]["eer"] for r in runs]) for s in SCORERS]
        cells.append(mean_sd([r["cal fus"]["eer"] for r in runs]) if calibrated else "–")
        cells += [paired(runs, "e2e"), paired(runs, "fus"), paired(runs, "cal fus") if calibrated else "–"]
        cells += [mean_sd([r[s]["mindcf_0.01"] for r in runs]) for s in SCORERS]
        measured = [r["cpu_s"] for r in group if r["cpu_s"] is not None]
        minutes = f"{sum(measured) / 60:.1f}" if len(measured) == len(group) else "–"
        lines.append(f"| {protocol} | {variant} | {len(runs)} | " + " | ".join(cells) + f" | {minutes} |")
    parts = ["\n".join(lines), calibration_table(groups), validation_table(groups), curves_table(groups)]
    return "\n\n".join(parts) + "\n\n" + per_run(record["runs"])


def calibration_table(groups):
    """Markdown: per calibrated column, Cllr against minCllr and actDCF against minDCF (means over runs)."""
    keys = ["cllr", "min_cllr"] + [f"{k}_{p:g}" for p in LLR_PRIORS for k in ("act_dcf", "mindcf")]
    head = "| protocol | variant | calibrated score | Cllr | minCllr | Cllr / minCllr (worst) | "
    head += " | ".join(f"{kind}({p:g})" for p in LLR_PRIORS for kind in ("actDCF", "minDCF"))
    lines = [head + " |", "|" + "---|" * (4 + len(keys))]
    for (protocol, variant), group in groups.items():
        for name in group[0].get("llr", {}):
            values = {k: [r["llr"][name][k] for r in group] for k in keys}
            ratios = [c / m if m > 0 else float("inf") for c, m in zip(values["cllr"], values["min_cllr"])]
            cells = [f"{np.mean(values['cllr']):.4f}", f"{np.mean(values['min_cllr']):.4f}"]
            cells.append(f"{np.mean(ratios):.2f} ({max(ratios):.2f})")
            cells += [f"{np.mean(values[k]):.4f}" for k in keys[2:]]
            lines.append(f"| {protocol} | {variant} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(groups):
    """Markdown: the validation EERs (held-out classes) at each run's chosen epoch, the basis of the choice."""
    head = "| protocol | variant | " + " | ".join(f"validation {s} EER" for s in SCORERS)
    lines = [head + " | validation e2e − cos | validation fus − cos |", "|" + "---|" * 7]
    for (protocol, variant), group in groups.items():
        at = [{s: r["valid"][s][r["epoch"] - 1] for s in SCORERS} for r in group]
        cells = [mean_sd([v[s] for v in at]) for s in SCORERS]
        cells += [mean_sd([v[s] - v["cos"] for v in at]) for s in ("e2e", "fus")]
        lines.append(f"| {protocol} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves_table(groups):
    """Markdown: the learning curves, mean validation EER per epoch over the runs, for each scorer."""
    lines = ["| protocol | variant | scorer | validation EER per epoch (mean over runs) |", "|---|---|---|---|"]
    for (protocol, variant), group in groups.items():
        for scorer in SCORERS:
            curves = [r["valid"][scorer] for r in group]
            n = min(len(c) for c in curves)
            mean = [np.mean([c[i] for c in curves]) for i in range(n)]
            text = " ".join("–" if not np.isfinite(v) else f"{v:.3f}" for v in mean)
            lines.append(f"| {protocol} | {variant} | {scorer} | {text} |")
    return "\n".join(lines)


# The per-run table's metrics, as eval.py's JSON names them, and their column titles.
RUN_METRICS = (("eer", "EER"), ("mindcf_0.01", "minDCF(0.01)"), ("auc", "AUC"))


def per_run(runs):
    """Markdown: every run (seed or fold) on its own line, each scorer's metrics, for paired comparisons."""
    head = "| protocol | variant | seed or fold | epoch | "
    head += " | ".join(f"{s} {t}" for _, t in RUN_METRICS for s in SCORERS)
    lines = [head + " |", "|" + "---|" * (4 + len(SCORERS) * len(RUN_METRICS))]
    for run in runs:
        cells = [f"{run['metrics'][s][key]:.4f}" for key, _ in RUN_METRICS for s in SCORERS]
        lines.append(
            f"| {run['protocol']} | {run['variant']} | {run['run']} | {run['epoch']} | " + " | ".join(cells) + " |"
        )
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
    "--select-by": dict(
        choices=benchlib.SELECT_BY, default="fus", help="the validation EER that picks each run's epoch (default fus)"
    ),
}
IMAGE_OPTIONS = {
    "--image-recipe": (
        benchlib.recipe_name,
        "image_noaug",
        "recipes/<name>.args of the image runs (default image_noaug)",
    ),
    "--image-epochs": (at_least(1), 10, "epochs of the image recipe (default 10)"),
    "--items-per-class": (at_least(2), 200, "Fashion-MNIST training images per class (default 200)"),
    "--test-items-per-class": (at_least(2), 300, "Fashion-MNIST open-set test images per class (300)"),
    "--font-test-items": (at_least(2), 20, "glyphs of each test font scored (default 20)"),
    "--open-split": (
        open_split,
        "/".join(OPEN_SPLIT.values()),
        "the open digits and Fashion-MNIST protocols' training/validation/test classes (default 0-4/5-6/7-9)",
    ),
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
    "--keep-dir": (str, None, "keep each run (checkpoints, scores) in DIR/<protocol>_<variant>_<run>"),
    "--reuse-kept": (
        "with --keep-dir: a kept run that trained all its epochs is scored again, not trained again (its CPU "
        "minutes come from its first run, when measured)",
    ),
    "--json-name": (str, None, "the JSON's name beside the page (default accuracy.json); one per table of the page"),
}


def build_parser():
    recipes = ("image recipe", IMAGE_OPTIONS), ("speech recipe", SPEECH_OPTIONS)
    files = {**FILE_OPTIONS, **benchlib.out_table("accuracy")}
    return benchlib.accuracy_parser(__doc__, EXAMPLE, RUN_OPTIONS, *recipes, files=files)


def main(argv=None):
    args = build_parser().parse_args(argv)
    benchlib.check_json_name(args.json_name)
    if args.reuse_kept and args.keep_dir is None:
        raise UserError("--reuse-kept reuses the runs of --keep-dir: give it")
    benchlib.make_folder(args.work_dir, "--work-dir")
    if "fonts" in args.protocols:
        benchlib.make_font_set(args.fonts)
    every = []
    for protocol in args.protocols:
        for variant in args.variants:
            for key in args.folds if protocol == "asterisk" else args.seeds:
                with run_folder(args, f"{protocol}_{variant}_{key}") as folder:
                    found = PROTOCOLS[protocol](folder, key, variant, args)
                every.append({"protocol": protocol, "variant": variant, "run": key, **found})
                line = "  ".join(f"{s} {found['metrics'][s]['eer']:.4f}" for s in SCORERS)
                kind = "fold" if protocol == "asterisk" else "seed"
                print(f"{protocol} {variant} {kind} {key}: epoch {found['epoch']}  EER {line}", flush=True)
    benchlib.publish(__file__, argv, args, every, render, args.out, args.json_name)
    return 0


if __name__ == "__main__":
    cli(main)
