"""Where does the learned distance overtake cosine? Test EER on unseen fonts vs the number of training fonts.

The font set of tools/font_set.py (a class = a font file, the test = unseen font families). For each
training-set size (8, 32, 128 and all training fonts, a seeded random choice of fonts per seed),
train.py runs the same number of optimisation steps (epochs are set from the batches an epoch holds;
the plateau schedule is held off, so only the class count changes), then eval.py scores all pairs of
the same unseen test fonts. Writes a markdown table (mean +- sd over seeds of each scorer's EER) and
a PNG plot (EER vs training classes, log x axis, one line per scorer and variant).
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
from benchlib import IMAGE_RECIPE, VARIANTS, at_least, children_cpu_seconds, mean_sd, python  # noqa: E402

from utils import UserError, atomic_path, cli  # noqa: E402

EXAMPLE = """example:
  python experiments/class_count.py --fonts runs/fonts32 --sizes 8,32,128,all --seeds 1,2,3"""
SCORERS = ("e2e", "cos", "fus")


def batches_per_epoch(labels, classes, group, groups_per_batch):
    """Batches GroupBatchSampler makes in one epoch from the items of `classes` (train.py's batching)."""
    counts = np.bincount(labels)[classes]
    groups = int((counts // group).sum())
    return max(1, groups // groups_per_batch)


def run_size(args, fonts, labels, n_all, size, seed, variant, work):
    """Train on `size` training fonts for --steps steps, score the unseen test fonts; -> eval metrics."""
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.permutation(n_all)[:size]) if size < n_all else np.arange(n_all)
    per_epoch = batches_per_epoch(labels, classes, 5, args.batch_size // 5)
    epochs = max(1, round(args.steps / per_epoch))
    cp = os.path.join(work, "cp")
    flags = [*IMAGE_RECIPE, "--batch-size", str(args.batch_size), "--epochs", str(epochs), "--patience", "100000"]
    valid_items = str(max(300, 2 * size + 2))  # at least two held-out glyphs of every font: target pairs
    flags += ["--data-path", f"{fonts}/train", "--valid-data-path", f"{fonts}/valid", "--valid-max-items", valid_items]
    flags += ["--classes", ",".join(map(str, classes)), "--seed", str(seed), "--checkpoint-path", cp]
    flags += ["--width", str(args.width), "--save-every", str(epochs), "--verbose", "0", *VARIANTS[variant]]
    python("train.py", *flags, threads=args.threads)
    out = os.path.join(work, "scores.out")
    test = ["--data-path", f"{fonts}/test", "--items-per-class", str(args.test_items_per_class)]
    checkpoint = os.path.join(cp, f"checkpoint_{epochs}ep.pt")
    python("eval.py", "--cp-path", checkpoint, "--out-path", out, "--device", "cpu", *test, threads=args.threads)
    with open(out + ".json") as handle:
        return json.load(handle)["metrics"], epochs * per_epoch


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
    """Markdown: one row per (variant, training-font count), mean ± sd over seeds."""
    lines = ["| training fonts | variant | steps | " + " | ".join(f"{s} EER" for s in SCORERS) + " | CPU min |"]
    lines.append("|" + "---|" * (4 + len(SCORERS)))
    groups = {}
    for run in record["runs"]:
        groups.setdefault((run["variant"], run["size"]), []).append(run)
    for (variant, size), group in groups.items():
        cells = [mean_sd([r["metrics"][s]["eer"] for r in group]) for s in SCORERS]
        minutes = sum(r["cpu_s"] for r in group) / 60
        lines.append(f"| {size} | {variant} | {group[0]['steps']} | " + " | ".join(cells) + f" | {minutes:.1f} |")
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
    "--steps": (at_least(1), 300, "optimisation steps of every run (default 300)"),
    "--batch-size": (at_least(10), 60, "images per batch, groups of 5, at least 2 groups (default 60)"),
    "--width": (at_least(1), 16, "resnet first-stage width (default 16)"),
    "--test-items-per-class": (at_least(2), 16, "glyphs of each test font scored (16)"),
}
OUT_OPTION = {
    "--out": (
        str,
        os.path.join(benchlib.RESULTS, "class_count"),
        "output prefix: <out>.md, <out>.json, <out>.png (default docs/results/class_count)",
    )
}


def build_parser():
    return benchlib.accuracy_parser(__doc__, EXAMPLE, RUN_OPTIONS, ("recipe", RECIPE_OPTIONS), files=OUT_OPTION)


def main(argv=None):
    import data_load

    args = build_parser().parse_args(argv)
    benchlib.make_folder(os.path.dirname(os.path.abspath(args.out)), "--out")
    benchlib.make_font_set(args.fonts)
    train_set = data_load.load_images(f"{args.fonts}/train", "train")
    labels, n_all = train_set.labels, int(train_set.labels.max()) + 1
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
                    metrics, steps = run_size(args, args.fonts, labels, n_all, size, seed, variant, work)
                cpu = children_cpu_seconds() - start
                every.append({"variant": variant, "size": size, "seed": seed, "steps": steps, "metrics": metrics,
                              "cpu_s": cpu})  # fmt: skip
                line = "  ".join(f"{s} {metrics[s]['eer']:.4f}" for s in SCORERS)
                print(f"{variant} {size} fonts seed {seed} ({steps} steps): EER {line}", flush=True)
    benchlib.publish(__file__, argv, args, every, render, args.out + ".md")
    results = {v: {s: [r["metrics"] for r in every if (r["variant"], r["size"]) == (v, s)] for s in sizes}
               for v in variants}  # fmt: skip
    plot(args.out + ".png", results, sizes)
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")
    return 0


if __name__ == "__main__":
    cli(main)
