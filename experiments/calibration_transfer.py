"""How far a calibration fitted before the test set is scored carries to the test classes.

Reads the runs experiments/accuracy.py kept (--keep-dir) and the embeddings experiments/backend_study.py made of
them (the same folders; embed.py runs only for those missing). For each run the cosine of its test trials is
turned into a log-likelihood ratio by a prior-weighted linear calibration at p 0.5 (the one train.py stores in
a checkpoint), fitted on each source of trials a user has before the test set is scored:
  validation         every pair of the run's validation classes: what the checkpoint carries (the image sets;
                     the Asterisk folds have no held-out speakers);
  validation + training non-targets
                     those pairs and every pair of a validation item with one of --train-items training items:
                     more class pairs for the non-target side, which 2 validation classes reduce to one;
  training classes   every pair of --train-items training items (classes the encoder trained on);
  no information     an LLR of 0 for every trial (Cllr exactly 1), the floor a shrunk calibration tends to.
Reported per set and per protocol: Cllr / minCllr on the test trials (the target of at most 1.1), actual DCF at
p 0.5 beside its minimum. The cosine stands in for the checkpoint's scores: on the few-class protocols the `cos`
encoders' learned distance ranks the trials as the cosine does (within 0.0001 EER); the checkpoint's own
calibration of both, on the fonts too, is in docs/results/accuracy.md.
"""

import os
import sys
from argparse import Namespace

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # backend_study, beside this script

import backend_study  # noqa: E402
import benchlib  # noqa: E402
import distance_backend  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import at_least, mean_sd  # noqa: E402

from e2e_verification import embedding_files  # noqa: E402
from e2e_verification.calibration import train_linear_llr  # noqa: E402
from e2e_verification.metrics import act_dcf, cllr, compute_mindcf, min_cllr  # noqa: E402
from utils import cli  # noqa: E402

EXAMPLE = """example (after experiments/accuracy.py --keep-dir runs/acc_keep ... --variants cos):
  python experiments/calibration_transfer.py --keep-dir runs/acc_keep --fonts runs/fonts16 \\
      --protocols digits-open,fmnist-open,fonts,asterisk --out docs/results/calibration_transfer.md"""
P_TARGET = 0.5  # train.py's checkpoint calibration prior (train_loop.CALIBRATION_P_TARGET)
TARGET_RATIO = 1.1  # the Cllr / minCllr a calibration must reach on the test classes
SOURCES = ("validation", "validation + training non-targets", "training classes", "no information")


def within_pairs(vectors, labels):
    """(cosines, same class) of every pair of distinct items."""
    a, b = np.triu_indices(len(vectors), k=1)
    return distance_backend.cosine_scores(vectors, a, b).astype(np.float64), labels[a] == labels[b]


def across_pairs(left, left_labels, right, right_labels):
    """(cosines, same class) of every item of `left` with every item of `right`."""
    scores = distance_backend.unit(left).astype(np.float64) @ distance_backend.unit(right).astype(np.float64).T
    return scores.ravel(), (left_labels[:, None] == right_labels[None, :]).ravel()


def calibration_sources(train, valid, train_items, seed):
    """{source: (cosines, same class)} of the trials each calibration is fitted on; train and valid are
    (vectors, labels); valid is None where the protocol holds out no classes."""
    vectors, labels = train
    keep = np.random.default_rng(seed).permutation(len(vectors))[:train_items]
    vectors, labels = vectors[keep], labels[keep]
    sources = {"training classes": within_pairs(vectors, labels)}
    if valid is not None:
        own = within_pairs(*valid)
        sources["validation"] = own
        cross = across_pairs(*valid, vectors, labels)
        sources["validation + training non-targets"] = tuple(np.concatenate(p) for p in zip(own, cross))
    return sources


def measure(llr, target):
    """Cllr and actual DCF at P_TARGET of an LLR on the test trials."""
    return {"cllr": float(cllr(llr, target)), "act_dcf": float(act_dcf(llr, target, P_TARGET))}


def transfer(test_scores, target, sources):
    """{source: metrics} of the test cosines calibrated on each source, and the test trials' own minima."""
    results = {"min_cllr": float(min_cllr(test_scores, target))}
    results["min_dcf"] = float(compute_mindcf(test_scores, target, P_TARGET))
    for name, (scores, same) in sources.items():
        w, b = train_linear_llr(scores, same, P_TARGET)
        results[name] = {**measure(test_scores * w[0] + b, target), "scale": float(w[0]), "offset": b}
        results[name]["fit_trials"] = int(len(same))
    results["no information"] = measure(np.zeros_like(test_scores), target)
    return results


def run_set(args, checkpoint, data):
    """Embed a kept run's training, validation and test items (kept folders reused) and measure each source."""
    backends = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "backends")
    folders = {part: os.path.join(backends, f"{part}_emb") for part in ("train", "test", "valid")}
    found = {}
    for part in ("train", "test", "valid"):
        if data[part]:
            found[part] = backend_study.embed(checkpoint, *data[part], folders[part], args)
    train = embedding_files.read_labelled(found["train"])[:2]
    valid = embedding_files.read_labelled(found["valid"])[:2] if "valid" in found else None
    trials = Namespace(test=found["test"], trials=data["trials"], test_utt2spk=None)
    emb, idx_a, idx_b, target = distance_backend.trial_pairs(trials)
    test_scores = distance_backend.cosine_scores(emb, idx_a, idx_b).astype(np.float64)
    return transfer(test_scores, target, calibration_sources(train, valid, args.train_items, args.seed))


def render(record):
    """Markdown: per protocol and source, the mean (worst) Cllr / minCllr over the sets and how many reach 1.1."""
    lines = [
        "| protocol | calibrated on | sets | Cllr | minCllr | Cllr / minCllr (worst) | sets at most 1.1 | actDCF(0.5) "
        "| minDCF(0.5) |",
        "|---" * 9 + "|",
    ]
    for protocol in dict.fromkeys(r["protocol"] for r in record["runs"]):
        runs = [r["results"] for r in record["runs"] if r["protocol"] == protocol]
        for source in SOURCES:
            found = [(r[source], r) for r in runs if source in r]
            if not found:
                continue
            ratios = [f["cllr"] / r["min_cllr"] for f, r in found]
            cells = [
                str(len(found)),
                mean_sd([f["cllr"] for f, _ in found]),
                mean_sd([r["min_cllr"] for _, r in found]),
                f"{np.mean(ratios):.2f} ({max(ratios):.2f})",
                f"{sum(x <= TARGET_RATIO for x in ratios)}/{len(ratios)}",
                mean_sd([f["act_dcf"] for f, _ in found]),
                mean_sd([r["min_dcf"] for _, r in found]),
            ]
            lines.append(f"| {protocol} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# the options this study shares with backend_study.py, whose embeddings it reads
SHARED = "--keep-dir --protocols --select-by --fonts --font-test-items --items-per-class --test-items-per-class"
SHARED += " --open-split"
OPTIONS = {
    **{flag: backend_study.OPTIONS[flag] for flag in (*SHARED.split(), "--asterisk-dir", "--threads", "--json-name")},
    "--variant": dict(default="cos", help="the kept runs' learned-distance variant (default cos)"),
    "--train-items": (at_least(2), 1500, "training items drawn for the training-class pairs (default 1500)"),
    "--seed": (at_least(0), 0, "seed of that draw (default 0)"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.out_table("calibration_transfer"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    benchlib.check_json_name(args.json_name)
    runs = []
    for protocol in args.protocols:
        for name, checkpoint, data in backend_study.sets_of(args, protocol):
            results = run_set(args, checkpoint, data)
            print(f"{protocol} {name}: minCllr {results['min_cllr']:.3f}, " + ", ".join(
                f"{s} {results[s]['cllr']:.3f}" for s in SOURCES if s in results), flush=True)  # fmt: skip
            runs.append({"protocol": protocol, "set": name, "checkpoint": checkpoint, "results": results})
    benchlib.publish(__file__, argv, args, runs, render, args.out, args.json_name)
    return 0


if __name__ == "__main__":
    cli(main)
