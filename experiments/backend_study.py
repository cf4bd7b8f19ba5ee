"""The learned distance as a back-end on the encoders of the accuracy study, beside cosine and PLDA.

Reads the runs experiments/accuracy.py kept (--keep-dir) for the fonts, the Asterisk folds and the open digits and
Fashion-MNIST protocols: for each run of --variant it takes the epoch that run was scored at (its held-out
validation choice, --select-by), embeds with embed.py the training items (all training fonts; the fold's training
speakers; the training classes' images) and the test items (--font-test-items glyphs of each unseen font; the
fold's test utterances; the test classes' images, as accuracy.py scored them), then trains PLDA (train_plda.py)
and one learned distance per --variants (train_distance.py) on the training embeddings and scores the test trials
(every pair of the test items; the fold's trials) with the cosine, PLDA and each distance
(experiments/distance_backend.py). Each distance keeps the step of the lowest EER on held-out classes
(--held-out): some of the training classes (train_distance.py --valid-classes), or the run's validation classes,
which neither the encoder nor the distance trained on (embedded too; --valid-embeddings). Reported per set: EER,
minDCF(0.01), AUC, Cllr / minCllr of the LLR scorers, each back-end's training seconds and the held-out EERs
that chose its step; then the mean over the sets of a protocol, with the paired difference of each back-end to
the cosine of the same embeddings and how many distances kept their untrained start (for `cos`: the cosine).
"""

import os
import sys

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # distance_backend, beside this script

import accuracy  # noqa: E402
import benchlib  # noqa: E402
import distance_backend  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import at_least, mean_sd, python  # noqa: E402

from data_load import FASHION_DIR  # noqa: E402
from models.verifier import PAIR_FEATURES  # noqa: E402
from utils import UserError, cli  # noqa: E402

EXAMPLE = """example:
  python experiments/accuracy.py --protocols fonts --variants concat --seeds 1-3 --fonts runs/fonts16 \\
      --keep-dir runs/acc_keep
  python experiments/backend_study.py --keep-dir runs/acc_keep --fonts runs/fonts16 --protocols fonts"""
PROTOCOLS = ("fonts", "asterisk", "digits-open", "fmnist-open")


def kept_runs(args, protocol):
    """[(run key, its checkpoint folder)] of the kept runs of `protocol` and --variant, in key order."""
    prefix = f"{protocol}_{args.variant}_"
    found = []
    for name in os.listdir(args.keep_dir):
        cp = os.path.join(args.keep_dir, name, "cp")
        if name.startswith(prefix) and name[len(prefix) :].isdigit() and os.path.isdir(cp):
            found.append((int(name[len(prefix) :]), cp))
    if not found:
        raise UserError(f"--keep-dir {args.keep_dir} holds no kept {protocol} run of variant {args.variant}")
    return sorted(found)


def embed(checkpoint, data, flags, out, args):
    """embed.py `data` (with its `flags`) with `checkpoint` into the folder `out` (kept: a second run reuses it);
    -> the folder."""
    if not os.path.isfile(os.path.join(out, "embeddings.h5")):
        python("embed.py", "--data", data, "--cp-path", checkpoint, "--out-path", out, "--device", "cpu", *flags,
               threads=args.threads)  # fmt: skip
    return out


def protocol_data(args, protocol, key):
    """{"train", "test", "valid": (data, embed.py flags) or None, "trials": path or None} of one kept run: the
    items the run trained on, its test items, and its validation classes (held out of the encoder's training;
    the Asterisk folds validate on their training speakers, so they have none)."""
    if protocol == "asterisk":
        data = os.path.join(args.asterisk_dir, f"asterisk_fold{key}")
        test = (f"{data}/test_feats/feats.scp", [])
        return {"train": (f"{data}/train.hdf", []), "test": test, "valid": None, "trials": f"{data}/test/trials"}
    if protocol == "fonts":
        items = ["--items-per-class", str(args.font_test_items)]
        sets = {"train": (f"{args.fonts}/train", []), "valid": (f"{args.fonts}/valid", items)}
        return {**sets, "test": (f"{args.fonts}/test", items), "trials": None}
    source = "digits" if protocol == "digits-open" else FASHION_DIR
    split = args.open_split
    train = ["--split", "train", "--classes", split["train"]]
    test = ["--classes", split["test"]]
    if protocol == "fmnist-open":
        train += ["--items-per-class", str(args.items_per_class)]
        test += ["--items-per-class", str(args.test_items_per_class)]
    valid = (source, ["--split", "valid", "--classes", split["valid"]])
    return {"train": (source, train), "valid": valid, "test": (source, test), "trials": None}


def sets_of(args, protocol):
    """[(set name, checkpoint, protocol_data)] of a protocol's kept runs."""
    sets = []
    for key, cp in kept_runs(args, protocol):
        checkpoint = benchlib.chosen_checkpoint(cp, args.select_by)[0]
        name = f"{'fold' if protocol == 'asterisk' else 'seed'} {key}"
        sets.append((name, checkpoint, protocol_data(args, protocol, key)))
    return sets


def run_set(args, protocol, name, checkpoint, data):
    """Embed one run's training, test (and held-out) items and score its test trials with every back-end."""
    if args.held_out == "valid" and data["valid"] is None:
        raise UserError(f"--held-out valid: the {protocol} runs have no validation classes to hold out")
    backends = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "backends")
    work = os.path.join(backends, f"held_out_{args.held_out}")
    os.makedirs(work, exist_ok=True)
    train_emb = embed(checkpoint, *data["train"], os.path.join(backends, "train_emb"), args)
    test_emb = embed(checkpoint, *data["test"], os.path.join(backends, "test_emb"), args)
    flags = ["--train", train_emb, "--test", test_emb, "--work-dir", work, "--variants", ",".join(args.variants)]
    flags += ["--trials", data["trials"]] if data["trials"] else []
    flags += ["--threads", str(args.threads), "--seed", str(args.seed)]
    if args.held_out == "valid":
        flags += ["--valid", embed(checkpoint, *data["valid"], os.path.join(backends, "valid_emb"), args)]
    else:
        flags += ["--valid-classes", str(args.valid_classes)]
    flags += ["--steps", str(args.steps)] if args.steps else []
    flags += ["--lda-dim", str(args.lda_dim)] if args.lda_dim else []
    print(f"{protocol} {name}: training the back-ends", flush=True)
    return distance_backend.evaluate(distance_backend.build_parser().parse_args(flags))


CHOICE = "held-out choice"  # the summary row of the scorer each set's held-out classes chose


CHOICE_FUS = "held-out choice, fused"  # its fixed fusion with the cosine (the cosine when the choice is the cosine)


def with_choice(results):
    """A set's results with the held-out choice (distance_backend.held_out_choice) and its fusion with the cosine
    added as scorers of their own."""
    chosen = distance_backend.held_out_choice(results)
    if chosen is None:
        return results
    fused = "cos" if chosen == "cos" else f"fus_{chosen[5:]}"
    added = {CHOICE: {**results[chosen], "chosen": chosen}}
    if fused in results:
        added[CHOICE_FUS] = {**results[fused], "chosen": fused}
    return {**results, **added}


def render(record):
    """Markdown: the mean over each protocol's sets (paired differences to cosine), then every set."""
    scorers = list(dict.fromkeys(s for run in record["runs"] for s in with_choice(run["results"])))
    head = "| protocol | scorer | sets | EER | EER − cosine (wins) | minDCF(0.01) | Cllr | minCllr | training s |"
    lines = [head + " untrained kept (chosen) |", "|---" * 10 + "|"]
    for protocol in dict.fromkeys(r["protocol"] for r in record["runs"]):
        runs = [with_choice(r["results"]) for r in record["runs"] if r["protocol"] == protocol]
        for scorer in scorers:
            if scorer in (CHOICE, CHOICE_FUS) and not all(scorer in r for r in runs):
                continue
            found = [r[scorer] for r in runs if "failed" not in r[scorer]]
            if len(found) < len(runs):
                lines.append(
                    f"| {protocol} | {scorer} | {len(runs)} | not trained on {len(runs) - len(found)} |" + " |" * 6
                )
                continue
            diffs = [f["eer"] - r["cos"]["eer"] for f, r in zip(found, runs)]
            cells = [
                mean_sd([f["eer"] for f in found]),
                f"{mean_sd(diffs)} ({sum(d <= 0 for d in diffs)}/{len(diffs)})",
            ]
            cells.append(mean_sd([f["mindcf_0.01"] for f in found]))
            cells += [
                mean_sd([f[k] for f in found]) if all(k in f for f in found) else "" for k in ("cllr", "min_cllr")
            ]
            times = [f["train_seconds"] for f in found if "train_seconds" in f]
            cells.append(f"{np.mean(times):.1f} (max {max(times):.1f})" if times and "chosen" not in found[0] else "")
            steps = [f["best_step"] for f in found if "best_step" in f]
            cells.append(f"{sum(step == 0 for step in steps)}/{len(steps)}" if steps else "")
            if scorer in (CHOICE, CHOICE_FUS):
                picks = [f["chosen"] for f in found]
                cells[-1] = ", ".join(f"{name} {picks.count(name)}" for name in dict.fromkeys(picks))
            lines.append(f"| {protocol} | {scorer} | {len(runs)} | " + " | ".join(cells) + " |")
    sets = []
    for r in record["runs"]:
        chosen = distance_backend.held_out_choice(r["results"])
        note = f"\nHeld-out choice: {chosen}.\n" if chosen else ""
        sets.append(f"### {r['protocol']}, {r['set']}\n\n" + distance_backend.render({"runs": r["results"]}) + note)
    return "\n".join(lines) + "\n\n" + "\n".join(sets)


OPTIONS = {
    "--keep-dir": dict(required=True, help="experiments/accuracy.py --keep-dir of the runs"),
    "--protocols": (
        benchlib.name_list(PROTOCOLS, "protocol"),
        "fonts,asterisk",
        "from: " + ", ".join(PROTOCOLS) + " (default fonts,asterisk)",
    ),
    "--variant": dict(default="concat", help="the kept runs' learned-distance variant (default concat)"),
    "--select-by": dict(
        choices=benchlib.SELECT_BY, default="fus", help="accuracy.py --select-by of the runs (default fus)"
    ),
    "--variants": (
        benchlib.name_list(tuple(PAIR_FEATURES), "variant"),
        ",".join(PAIR_FEATURES),
        "back-end distance variants, from: " + ", ".join(PAIR_FEATURES) + " (default all)",
    ),
    "--fonts": (str, "runs/fonts16", "the font set of the fonts runs (default runs/fonts16)"),
    # the accuracy study's own options: its runs are embedded as it trained and scored them
    **{
        flag: accuracy.IMAGE_OPTIONS[flag]
        for flag in ("--font-test-items", "--items-per-class", "--test-items-per-class", "--open-split")
    },
    "--asterisk-dir": (str, "runs/accuracy", "accuracy.py --work-dir holding the folds (default runs/accuracy)"),
    "--steps": (at_least(1), None, "train_distance.py --steps (default its own)"),
    "--held-out": dict(
        choices=("train", "valid"),
        default="train",
        help="the classes that choose each distance's step: train = --valid-classes of the training classes "
        "(default); valid = the run's own validation classes, which the encoder never trained on either "
        "(train_distance.py --valid-embeddings; not for Asterisk, whose folds have none)",
    ),
    "--valid-classes": (str, "0.1", "train_distance.py --valid-classes: held-out classes, a count or fraction (0.1)"),
    "--lda-dim": (at_least(0), 0, "PLDA's LDA size (default 0: no LDA)"),
    "--seed": (at_least(0), 1, "seed of the distances' training (default 1)"),
    "--threads": (at_least(1), 2, "torch CPU threads (default 2)"),
    "--json-name": (str, None, "the JSON's name beside the page (default backend_study.json); one per table"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.out_table("backend_study"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    benchlib.check_json_name(args.json_name)
    torch.set_num_threads(args.threads)
    runs = []
    for protocol in args.protocols:
        for name, checkpoint, data in sets_of(args, protocol):
            results = run_set(args, protocol, name, checkpoint, data)
            runs.append({"protocol": protocol, "set": name, "checkpoint": checkpoint, "results": results})
    benchlib.publish(__file__, argv, args, runs, render, args.out, args.json_name)
    return 0


if __name__ == "__main__":
    cli(main)
