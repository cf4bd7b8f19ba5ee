"""Why does the toolkit's image encoder lag a plain CosFace loop, and which recipe closes the gap?

Each arm trains over --seeds on a protocol of experiments/plain_cosface.py (fonts: training fonts ->
unseen valid/ families -> unseen test/ families; fmnist-open: 0-4 -> 5-9) at the same width, epochs,
batch size and SGD settings (recipes/image_small.args), and is scored by cosine on all pairs of the
held-out validation classes; --test scores the test classes too (once, for the final choice).

  plain*    the plain loop of plain_cosface.py (CosFaceLoss on the encoder's classification input, shuffled
            batches, constant LR), scored on what the loss normalises
  toolkit*  train.py @recipes/image_small.args (or --recipe) + the arm's flags, in a subprocess; the final
            checkpoint is loaded (checkpoints.load_model) and both encoder outputs are scored by cosine:
            cos = the embedding (what eval.py scores, and what the learned distance sees), cos_latent = the
            classification input (what the margin loss normalises); e2e and fus as eval.py computes them

Every run keeps its model and metrics under --work-dir/<protocol>/<arm>_s<seed>/, so a second call (other
arms, --test) reuses them; the table shows each arm's mean cosine EER over its seeds beside the plain
loop's (`plain`) on the same seeds, as a ratio.
"""

import json
import os
import sys
import time

# plain_cosface lives beside this file; benchlib (the shared helpers of bench/ and experiments/) in bench/
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "bench")]

import benchlib  # noqa: E402
import plain_cosface as plain  # noqa: E402
import torch  # noqa: E402
from benchlib import at_least, mean_sd, name_list, python  # noqa: E402

from utils import UserError, atomic_write, cli  # noqa: E402

EXAMPLE = """examples:
  python tools/font_set.py --out runs/fonts16 --size 16 --test-families 40 --valid-open
  python experiments/encoder_study.py --protocols fonts --arms plain,toolkit,toolkit-no-augment --seeds 1
  python experiments/encoder_study.py --protocols fonts --arms plain,toolkit-no-augment --seeds 1-3 --test
  python experiments/encoder_study.py --protocols fmnist-open --epochs 10 --eval-items 300 --arms plain,recommended \\
      --recipe image_noaug --seeds 1-3 --test --out docs/results/encoder_study.md \\
      --json-name encoder_study_fmnist.json"""

CROP = ["--augment", "crop"]
BARE = ["--augment", "none", "--smoothing", "0", "--max-gnorm", "0"]  # the recipe less what the plain loop lacks
# The arms: ("plain", the plain loop's augmentation) or ("toolkit", train.py flags after the recipe's).
ARMS = {
    "plain": ("plain", "none"),
    "plain-crop": ("plain", "crop"),
    "toolkit": ("toolkit", CROP),  # last round's toolkit run: recipes/image_small.args --augment crop
    "toolkit-no-smoothing": ("toolkit", [*CROP, "--smoothing", "0"]),
    "toolkit-no-clip": ("toolkit", [*CROP, "--max-gnorm", "0"]),
    "toolkit-no-augment": ("toolkit", ["--augment", "none"]),
    "toolkit-bare": ("toolkit", BARE),
    "toolkit-bare-random": ("toolkit", [*BARE, "--sampler", "random"]),
    "toolkit-bare-pair-0": ("toolkit", [*BARE, "--pair-weight", "0"]),
    "toolkit-bare-sym": ("toolkit", [*BARE, "--pair-features", "sym"]),
    "toolkit-bare-norm": ("toolkit", [*BARE, "--distance-norm"]),
    "toolkit-bare-detach": ("toolkit", [*BARE, "--detach-distance"]),
    "toolkit-no-augment-gnorm-20": ("toolkit", ["--augment", "none", "--max-gnorm", "20"]),
    "toolkit-no-augment-no-clip": ("toolkit", ["--augment", "none", "--max-gnorm", "0"]),
    "toolkit-no-augment-no-smoothing": ("toolkit", ["--augment", "none", "--smoothing", "0"]),
    "recommended": ("toolkit", []),  # the --recipe file as it is (e.g. image_noaug)
}
SCORERS = ("cos", "cos_latent", "e2e", "fus")


def recipe_value(flags, name, default):
    """The value of flag `name` in a recipe's flag list (the last one wins), else `default`."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == name]
    return values[-1] if values else default


def train_toolkit(args, sets, seed, flags, folder):
    """train.py with the recipe, the protocol's data and the arm's `flags`; -> the final checkpoint's path."""
    cp = os.path.join(folder, "cp")
    run = [*benchlib.recipe(args.recipe), "--width", str(args.width), "--epochs", str(args.epochs)]
    run += [*sets.train_flags, "--seed", str(seed), "--checkpoint-path", cp, "--save-every", str(args.epochs)]
    run += ["--workers", "0", "--device", "cpu", "--verbose", "0", *flags]
    python("train.py", *run, threads=args.threads)
    return os.path.join(cp, f"checkpoint_{args.epochs}ep.pt")


def score_toolkit(checkpoint, sets, splits):
    """{split: {scorer: metrics}}: cosine of both encoder outputs, and e2e / fus through the learned distance."""
    from e2e_verification.checkpoints import load_model
    from e2e_verification.scoring import VALIDATION_SCORERS, evaluate_scores, score_all_pairs

    model = load_model(checkpoint)
    out = plain.score_encoder(model.encoder, sets, splits, (("cos", 0), ("cos_latent", 1)))
    for split in splits:
        emb, labels = plain.embed(model.encoder, sets.held_out[split], 0)
        with torch.no_grad():
            scores, same = score_all_pairs(model.distance, emb, labels, scorers=VALIDATION_SCORERS)
        learned = evaluate_scores({s: scores[s] for s in ("e2e", "fus")}, same, p_targets=(0.01,))
        out[split].update(learned)
    return out


def run_arm(args, sets, protocol, arm, seed):
    """Train (unless kept) and score one arm on one seed; -> {split: {scorer: metrics}}, cached in its folder."""
    name = f"{arm}_w{args.width}_e{args.epochs}_s{seed}"  # a run of other settings is another folder
    folder = benchlib.make_folder(os.path.join(args.work_dir, protocol, name), "--work-dir")
    record_path = os.path.join(folder, "metrics.json")
    record = {"metrics": {}, "train_s": None, "recipe": args.recipe if ARMS[arm][0] == "toolkit" else None}
    if os.path.isfile(record_path):
        with open(record_path) as handle:
            record = json.load(handle)
    if record.get("eval_items") != args.eval_items:  # scored on another draw of held-out items: score again
        record.update(metrics={}, eval_items=args.eval_items)
    splits = [s for s in ("valid", "test") if s == "valid" or args.test]
    missing = [s for s in splits if s not in record["metrics"]]
    if "failed" in record or not missing:
        return record
    kind, how = ARMS[arm]
    if args.score_only and not any(name.endswith(".pt") for _, _, names in os.walk(folder) for name in names):
        return None  # not trained, and --score-only trains nothing
    start = time.time()
    if kind == "plain":
        model_path = os.path.join(folder, "encoder.pt")
        if not os.path.isfile(model_path):
            encoder, encoder_args = plain.train_plain(args, sets, seed, how)
            torch.save({"encoder_args": encoder_args, "state": encoder.state_dict()}, model_path)
            record["train_s"] = time.time() - start
        saved = torch.load(model_path, weights_only=True)
        encoder, _ = plain.build_encoder(args, sets)
        encoder.load_state_dict(saved["state"])
        scored = plain.score_encoder(encoder.eval(), sets, missing, (("cos", 1), ("cos_latent", 1)))
    else:
        checkpoint = os.path.join(folder, "cp", f"checkpoint_{args.epochs}ep.pt")
        if not os.path.isfile(checkpoint):
            try:
                train_toolkit(args, sets, seed, how, folder)
            except UserError as err:  # e.g. a loss that became NaN: recorded, and the study goes on
                record["failed"] = str(err)
                missing = []
            record["train_s"] = time.time() - start
        scored = score_toolkit(checkpoint, sets, missing) if missing else {}
    record["metrics"].update(scored)
    with atomic_write(record_path) as handle:
        json.dump(record, handle, indent=1)
    return record


def cell(runs, split, scorer, key="eer"):
    values = [r["metrics"][split][scorer][key] for r in runs if scorer in r["metrics"].get(split, {})]
    return mean_sd(values) if values else "-", values


def render(record):
    """Markdown: per protocol, split and arm, mean ± sd over seeds of each scorer's EER, cosine minDCF(0.01) and
    the arm's mean cosine EER over the plain loop's (`plain`, the same seeds)."""
    head = "| protocol | split | arm | seeds | " + " | ".join(f"{s} EER" for s in SCORERS)
    lines = [head + " | cos minDCF(0.01) | cos EER / plain |", "|" + "---|" * (len(SCORERS) + 6)]
    groups = {}
    for run in record["runs"]:
        for split in run["metrics"]:
            groups.setdefault((run["protocol"], split), {}).setdefault(run["arm"], []).append(run)
    for (protocol, split), arms in sorted(groups.items()):
        base = {r["seed"]: r["metrics"][split]["cos"]["eer"] for r in arms.get("plain", [])}
        for arm, runs in arms.items():
            cells = [cell(runs, split, s)[0] for s in SCORERS]
            paired = [(r["metrics"][split]["cos"]["eer"], base[r["seed"]]) for r in runs if r["seed"] in base]
            ratio = f"{sum(a for a, _ in paired) / sum(b for _, b in paired):.3f}" if paired else "-"
            dcf = cell(runs, split, "cos", "mindcf_0.01")[0]
            lines.append(
                f"| {protocol} | {split} | {arm} | {len(runs)} | " + " | ".join(cells) + f" | {dcf} | {ratio} |"
            )
    failed = [f"{r['protocol']} {r['arm']} seed {r['seed']}: {r['failed']}" for r in record["runs"] if "failed" in r]
    return "\n".join(lines + [""] + [f"Failed: {line}" for line in failed]).rstrip() + "\n"


RUN_OPTIONS = {
    **plain.RUN_OPTIONS,
    "--arms": (name_list(ARMS, "arm"), "plain,toolkit", "comma-separated, from: " + ", ".join(ARMS)),
    "--score-only": dict(action="store_true", help="train nothing: report (and score) the runs kept in --work-dir"),
}
RECIPE = benchlib.recipe("image_small")
RECIPE_OPTIONS = {
    "--recipe": (str, "image_small", "recipes/<name>.args of the toolkit arms (default image_small)"),
    "--width": (at_least(1), 16, "resnet first-stage width of every arm (default 16)"),
    "--epochs": (at_least(1), 3, "epochs of every arm (default 3)"),
    "--model": (str, "resnet", "image encoder of the plain loop; the toolkit's is the recipe's (default resnet)"),
    "--batch-size": (at_least(2), int(recipe_value(RECIPE, "--batch-size", 64)), "plain loop batch (the recipe's)"),
    "--lr": (benchlib.positive_float, float(recipe_value(RECIPE, "--lr", 0.05)), "plain loop LR (the recipe's)"),
    "--momentum": (
        benchlib.number(float, 0, 1),
        float(recipe_value(RECIPE, "--momentum", 0.9)),
        "plain loop momentum (the recipe's)",
    ),
    "--l2": (benchlib.number(float, 0), float(recipe_value(RECIPE, "--l2", 1e-4)), "plain loop weight decay"),
}
DATA_OPTIONS = {
    **{k: v for k, v in plain.DATA_OPTIONS.items()},
    "--work-dir": (str, "runs/encoder_study", "kept models and metrics of every run (default runs/encoder_study)"),
    "--json-name": (
        str,
        None,
        "the table's JSON, a file name beside --out (default: --out's name, .json); one per "
        "table when a page holds several (e.g. one per protocol, each with its own --epochs)",
    ),
}


def build_parser():
    out = benchlib.out_table("encoder_study")
    return benchlib.make_parser(__doc__, EXAMPLE, ("what to run", RUN_OPTIONS), ("recipe", RECIPE_OPTIONS),
                                ("data", {**DATA_OPTIONS, **out}))  # fmt: skip


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for protocol in args.protocols:
        sets = plain.PROTOCOLS[protocol](args)
        for arm in args.arms:
            for seed in args.seeds:
                record = run_arm(args, sets, protocol, arm, seed)
                if record is None:
                    continue
                runs.append({"protocol": protocol, "arm": arm, "seed": seed, **record})
                if "failed" in record:
                    print(f"{protocol} {arm} seed {seed}: failed: {record['failed']}", flush=True)
                    continue
                line = "  ".join(f"{s}: " + " ".join(f"{k} {m['eer']:.4f}" for k, m in by.items())
                                 for s, by in record["metrics"].items())  # fmt: skip
                print(f"{protocol} {arm} seed {seed}: {line}", flush=True)
    benchlib.publish(__file__, argv, args, runs, render, args.out, args.json_name)
    return 0


if __name__ == "__main__":
    cli(main)
