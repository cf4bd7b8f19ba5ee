"""Where does the learned distance overtake cosine? Test EER on unseen fonts vs the number of training fonts.

The font set of tools/font_set.py (a class = a font file, the test = unseen font families). For each
training-set size (8, 32, 128 and all training fonts, a seeded random choice of fonts per seed),
train.py runs the same number of optimisation steps with the --recipe (epochs are set from the batches an epoch
holds; the plateau schedule is held off, so only the class count changes), validates every epoch on the unseen
fonts of the training packages (tools/font_set.py's valid/) and keeps the epoch of the lowest validation
--select-by EER (train.py --select-by); eval.py scores that checkpoint on all pairs of the same unseen test
fonts. Writes a markdown table (mean +- sd over seeds of each scorer's EER, and e2e and fused minus cosine, seed
by seed) and a PNG plot (EER vs training classes, log x axis, one line per scorer and variant).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import VARIANTS, at_least, children_cpu_seconds, mean_sd, python  # noqa: E402

from utils import UserError, atomic_path, cli  # noqa: E402

EXAMPLE = """example:
  python experiments/class_count.py --fonts runs/fonts16 --sizes 8,32,128,all --seeds 1,2,3 --variants concat"""
SCORERS = ("e2e", "cos", "fus")


def batches_per_epoch(labels, classes, group, groups_per_batch):
    """Batches GroupBatchSampler makes in one epoch from the items of `classes` (train.py's batching)."""
    counts = np.bincount(labels)[classes]
    groups = int((counts // group).sum())
    return max(1, groups // groups_per_batch)


def run_size(args, fonts, labels, n_all, size, seed, variant, work, n_valid):
    """Train on `size` training fonts for --steps steps, score the unseen test fonts with the epoch chosen on the
    validation fonts; -> (eval metrics, steps, chosen epoch, epochs)."""
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.permutation(n_all)[:size]) if size < n_all else np.arange(n_all)
    per_epoch = batches_per_epoch(labels, classes, 5, args.batch_size // 5)
    epochs = max(1, round(args.steps / per_epoch))
    cp = os.path.join(work, "cp")
    flags = [*benchlib.recipe(args.recipe), "--batch-size", str(args.batch_size), "--epochs", str(epochs)]
    flags += ["--patience", "100000", "--select-by", args.select_by, "--keep-checkpoints", "1"]
    valid_items = str(max(300, 2 * size + 2))  # at least two held-out glyphs of every font: target pairs
    flags += ["--data-path", f"{fonts}/train", "--valid-data-path", f"{fonts}/valid", "--valid-max-items", valid_items]
    flags += ["--classes", ",".join(map(str, classes)), "--valid-classes", f"0-{n_valid - 1}"]  # every valid font
    flags += ["--seed", str(seed), "--checkpoint-path", cp]
    flags += ["--width", str(args.width), "--verbose", "0", *VARIANTS[variant]]
    python("train.py", *flags, threads=args.threads)
    checkpoint, epoch, _ = benchlib.chosen_checkpoint(cp, args.select_by)  # the file train.py's --select-by kept
    out = os.path.join(work, "scores.out")
    test = ["--data-path", f"{fonts}/test", "--items-per-class", str(args.test_items_per_class)]
    python("eval.py", "--cp-path", checkpoint, "--out-path", out, "--device", "cpu", *test, threads=args.threads)
    with open(out + ".json") as handle:
        metrics = json.load(handle)["metrics"]
    return metrics, epochs * per_epoch, epoch, epochs


def plot(path, results, sizes_used):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"concat": "-", "sym": "--", "concat-norm": ":", "sym-detach": "-."}
    colours = {"e2e": "tab:red", "cos": "tab:blue", "fus": "tab:green"}
    for variant, by_size in results.items():
        for scorer in SCORERS:
            means = [statistics.mean(r[scorer]["eer"] for r in by_size[s]) for s in sizes_used]
            ax.plot(sizes_used, means, styles.get(variant, "-"), color=colours[scorer], marker="o",
                    label=f"{scorer} ({variant})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes_used, [str(s) for s in sizes_used])
    ax.set_xlabel("training classes (fonts)")
    ax.set_ylabel("EER on unseen font families")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def render(record):
    """Markdown: one row per (variant, training-font count), mean ± sd over seeds, and the seed-by-seed differences
    of the learned distance and the fusion to cosine."""
    head = "| training fonts | variant | steps | epoch chosen / epochs | " + " | ".join(f"{s} EER" for s in SCORERS)
    lines = [head + " | e2e − cos (wins) | fus − cos (wins) | CPU min |", "|" + "---|" * (7 + len(SCORERS))]
    groups = {}
    for run in record["runs"]:
        groups.setdefault((run["variant"], run["size"]), []).append(run)
    for (variant, size), group in groups.items():
        chosen = f"{statistics.mean(r['epoch'] for r in group):.1f} / {group[0]['epochs']}"
        cells = [mean_sd([r["metrics"][s]["eer"] for r in group]) for s in SCORERS]
        for scorer in ("e2e", "fus"):
            diffs = [r["metrics"][scorer]["eer"] - r["metrics"]["cos"]["eer"] for r in group]
            cells.append(f"{mean_sd(diffs)} ({sum(d <= 0 for d in diffs)}/{len(diffs)})")
        minutes = sum(r["cpu_s"] for r in group) / 60
        lines.append(
            f"| {size} | {variant} | {group[0]['steps']} | {chosen} | " + " | ".join(cells) + f" | {minutes:.1f} |"
        )
    return "\n".join(lines) + "\n"


def font_counts(text):
    """An argparse type: --sizes, comma-separated training-font counts (each at least 2) or 'all' -> a list."""
    sizes = []
    for part in text.split(","):
        if part.strip() == "all":
            sizes.append("all")
            continue
        try:
            sizes.append(at_least(2)(part))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (counts of at least 2 fonts, or all), in {text!r}") from None
    return sizes


RUN_OPTIONS = {
    "--sizes": (font_counts, "8,32,128,all", "training-font counts, each at least 2, 'all' for every one"),
}
RECIPE_OPTIONS = {
    "--recipe": (benchlib.recipe_name, "image_noaug", "recipes/<name>.args of the runs (default image_noaug)"),
    "--steps": (at_least(1), 1000, "optimisation steps of every run (default 1000)"),
    "--select-by": dict(
        choices=benchlib.SELECT_BY, default="fus", help="the validation EER that picks each run's epoch (default fus)"
    ),
    "--batch-size": (at_least(10), 60, "images per batch, groups of 5, at least 2 groups (default 60)"),
    "--width": (at_least(1), 16, "resnet first-stage width (default 16)"),
    "--test-items-per-class": (at_least(2), 16, "glyphs of each test font scored (16)"),
}
OUT_OPTION = {
    "--out": (
        str,
        os.path.join(benchlib.RESULTS, "class_count"),
        "output prefix: <out>.md, <out>.json, <out>.png (default docs/results/class_count)",
    ),
    "--json-name": (
        str,
        None,
        "a second table on the page: its JSON's name beside it (e.g. class_count_cos.json), the plot named "
        "after it (class_count_cos.png)",
    ),
}


def build_parser():
    return benchlib.accuracy_parser(__doc__, EXAMPLE, RUN_OPTIONS, ("recipe", RECIPE_OPTIONS), files=OUT_OPTION)


def main(argv=None):
    import data_load

    args = build_parser().parse_args(argv)
    benchlib.check_json_name(args.json_name)
    benchlib.make_folder(os.path.dirname(os.path.abspath(args.out)), "--out")
    benchlib.make_font_set(args.fonts)
    train_set = data_load.load_images(f"{args.fonts}/train", "train")
    labels, n_all = train_set.labels, int(train_set.labels.max()) + 1
    n_valid = int(data_load.load_images(f"{args.fonts}/valid", "valid").labels.max()) + 1
    sizes = list(dict.fromkeys(n_all if s == "all" else s for s in args.sizes))  # each count once
    if any(s > n_all for s in sizes):
        raise UserError(f"--sizes must be at most the {n_all} training fonts, got {max(sizes)}")
    seeds, variants = args.seeds, args.variants
    every = []
    for variant in variants:
        for size in sizes:
            for seed in seeds:
                start = children_cpu_seconds()
                with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as work:
                    metrics, steps, epoch, epochs = run_size(
                        args, args.fonts, labels, n_all, size, seed, variant, work, n_valid
                    )
                cpu = children_cpu_seconds() - start
                every.append({"variant": variant, "size": size, "seed": seed, "steps": steps, "epoch": epoch,
                              "epochs": epochs, "metrics": metrics, "cpu_s": cpu})  # fmt: skip
                line = "  ".join(f"{s} {metrics[s]['eer']:.4f}" for s in SCORERS)
                print(f"{variant} {size} fonts seed {seed} ({steps} steps): EER {line}", flush=True)
    benchlib.publish(__file__, argv, args, every, render, args.out + ".md", args.json_name)
    results = {v: {s: [r["metrics"] for r in every if (r["variant"], r["size"]) == (v, s)] for s in sizes}
               for v in variants}  # fmt: skip
    png = args.out + ".png"
    if args.json_name:  # a second table of the page: the plot is named after its JSON
        png = os.path.join(os.path.dirname(args.out), args.json_name[: -len(".json")] + ".png")
    plot(png, results, sizes)
    print(f"wrote {args.out}.md, its JSON and {png}")
    return 0


if __name__ == "__main__":
    cli(main)
