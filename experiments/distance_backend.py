"""The learned distance as a back-end on fixed embeddings (train_distance.py), beside PLDA and the cosine.

Given embed.py's embeddings of training classes (--train, labelled by their `spk` attributes or --train-utt2spk)
and of test items (--test), it trains one distance per --variants (train_distance.py, choosing the step kept on
held-out classes: --valid, embeddings of other classes made by the same model, else --valid-classes of the
training classes) and a PLDA (train_plda.py, --lda-dim) on the training
embeddings, then scores the test trials (--trials, a Kaldi trials file) or, without one, every pair of the
labelled test items (labels from --test's `spk` attributes or --test-utt2spk) with the cosine, PLDA and each
distance (`dist_<variant>`, its logit; `fus_<variant>`, the research code's fixed fusion of its probability
with the cosine). It writes, per scorer, EER, minDCF(0.01), AUC and, for the LLR scorers
(plda, dist_*), Cllr and minCllr, with each back-end's training time (a PLDA that cannot be trained on the
embeddings, e.g. fewer items than dimensions, is reported with the reason). The trained files go in --work-dir.
Everything runs in this process, on the CPU, with --threads torch threads.
"""

import os
import sys
import time

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import at_least  # noqa: E402

import train_distance  # noqa: E402
import train_plda  # noqa: E402
from e2e_verification import backends, embedding_files, metrics, speech_data  # noqa: E402
from e2e_verification.plda import PLDA  # noqa: E402
from e2e_verification.scoring import fuse  # noqa: E402
from models.verifier import PAIR_FEATURES  # noqa: E402
from utils import UserError, check_outputs, cli, flag_value  # noqa: E402

EXAMPLE = """example:
  python embed.py --data data/train/feats.scp --utt2spk data/train/utt2spk --cp-path cp/best.pt \\
      --out-path exp/train_emb --min-frames 100
  python embed.py --data data/test/feats.scp --cp-path cp/best.pt --out-path exp/test_emb --min-frames 100
  python experiments/distance_backend.py --train exp/train_emb --test exp/test_emb --trials data/test/trials"""
CHUNK = 1 << 16  # pairs scored at once by the cosine and PLDA
COLUMNS = (
    ("EER", "eer"),
    ("minDCF(0.01)", "mindcf_0.01"),
    ("AUC", "auc"),
    ("Cllr", "cllr"),
    ("minCllr", "min_cllr"),
    ("training s", "train_seconds"),
    ("held-out EER", "valid_eer"),
    ("held-out cos EER", "valid_cos_eer"),
    ("step kept", "best_step"),
    ("sure", "valid_confidence"),
)
# what a distance's training record says of its choice (train_distance.py)
HELD_OUT = ("valid_eer", "valid_cos_eer", "best_step", "valid_confidence", "fell_back")
MIN_CONFIDENCE = train_distance.TRAINING["--min-confidence"][1]


def trial_pairs(args):
    """(test embeddings (N, d) float32, idx_a (T,), idx_b (T,), target (T,) bool): the --trials, else all pairs of
    the labelled test items."""
    if args.trials is None:
        vectors, speakers, _ = embedding_files.read_labelled(
            embedding_files.resolve(args.test, "--test"), args.test_utt2spk
        )
        a, b = np.triu_indices(len(vectors), k=1)
        return vectors, a, b, speakers[a] == speakers[b]
    found = embedding_files.read(args.test, "--test")
    enroll, test, target = speech_data.read_trials(args.trials)
    index = {utt: k for k, utt in enumerate(found.ids)}
    missing = sorted({utt for utt in (*enroll, *test) if utt not in index})
    if missing:
        raise UserError(f"{len(missing)} utterances of --trials have no embedding in --test (the first: {missing[0]})")
    return found.vectors, np.array([index[u] for u in enroll]), np.array([index[u] for u in test]), target


def chunked(score, idx_a, idx_b, chunk=CHUNK):
    """score(idx_a part, idx_b part) -> (part,) scores, a chunk of pairs at a time: (T,) float32."""
    parts = [np.asarray(score(idx_a[k : k + chunk], idx_b[k : k + chunk])) for k in range(0, len(idx_a), chunk)]
    return np.concatenate(parts).astype(np.float32)


def unit(emb):
    """Each row of emb (N, d) scaled to length 1 (a zero row stays zero)."""
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def cosine_scores(emb, idx_a, idx_b):
    """Cosine of each pair of items of emb (N, d)."""
    normed = unit(emb)
    return chunked(lambda a, b: (normed[a] * normed[b]).sum(1), idx_a, idx_b)


@torch.no_grad()
def distance_scores(path, emb, idx_a, idx_b):
    """The mean logit over the heads of train_distance.py's distance `path`, each pair of items of emb (N, d)."""
    distance = backends.load_distance(path).distance
    x = torch.from_numpy(emb)
    projected = distance.project(x)
    step = max(1, (1 << 22) // distance.pair_width)

    def score(a, b):
        return distance.projected_logits(projected, torch.from_numpy(a), torch.from_numpy(b)).mean(0).numpy()

    return chunked(score, idx_a, idx_b, step)


def train_backends(args):
    """Train every distance variant and the PLDA: -> {scorer: (scorer of (emb, idx_a, idx_b), training seconds)}."""
    train = ["--embeddings", args.train] + (["--utt2spk", args.train_utt2spk] if args.train_utt2spk else [])
    trained = {}
    plda_path = os.path.join(args.work_dir, "plda.json")
    start = time.perf_counter()
    try:  # PLDA cannot train on some embeddings (fewer items than dimensions): the study says why and goes on
        train_plda.main([*train, "--out", plda_path, *(["--lda-dim", str(args.lda_dim)] if args.lda_dim else [])])
    except UserError as err:
        print(f"PLDA not trained: {err}", flush=True)
        trained["plda"] = (str(err), 0.0, {})
    else:
        plda = PLDA.load(plda_path)
        score = (lambda e, a, b: chunked(lambda x, y: plda.score(e[x], e[y]), a, b), time.perf_counter() - start, {})
        trained["plda"] = score
    for variant in args.variants:
        path = os.path.join(args.work_dir, f"distance_{variant}.pt")
        flags = ["--pair-features", variant, "--seed", str(args.seed)]
        flags += ["--valid-embeddings", args.valid] if args.valid else ["--valid-classes", str(args.valid_classes)]
        flags += ["--steps", str(args.steps)] if args.steps else []
        start = time.perf_counter()
        train_distance.main([*train, "--out", path, "--device", "cpu", *flags])
        seconds = time.perf_counter() - start
        scorer = (lambda p: lambda e, a, b: distance_scores(p, e, a, b))(path)
        record = backends.load_distance(path).training
        trained[f"dist_{variant}"] = (scorer, seconds, {k: record[k] for k in HELD_OUT if k in record})
    return trained


def evaluate(args):
    """{scorer: metrics (and train_seconds)} of the cosine, PLDA and every distance on the test pairs."""
    emb, idx_a, idx_b, target = trial_pairs(args)
    if target.all() or not target.any():
        raise UserError("the test pairs must hold both targets and non-targets")
    print(f"{len(idx_a)} test pairs ({int(target.sum())} targets) of {len(emb)} items", flush=True)
    cosine = cosine_scores(emb, idx_a, idx_b)
    results = {"cos": metrics.compute_metrics(cosine, target)}
    fused = {}
    for name, (scorer, seconds, held_out) in train_backends(args).items():
        if isinstance(scorer, str):  # a back-end that could not be trained: why
            results[name] = {"failed": scorer}
            continue
        scores = scorer(emb, idx_a, idx_b)
        results[name] = {**metrics.compute_metrics(scores, target), **metrics.llr_metrics(scores, target)}
        results[name]["train_seconds"] = round(seconds, 2)
        results[name].update(held_out)
        if name.startswith("dist_"):  # the research code's fixed fusion of the distance's probability and cosine
            probability = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
            fused[f"fus_{name[5:]}"] = metrics.compute_metrics(fuse(probability, cosine), target)
    return {**results, **fused}


def held_out_choice(results, min_confidence=MIN_CONFIDENCE):
    """The scorer the held-out classes choose among a set's results, as train_distance.py --pair-features auto
    chooses (train_distance.held_out_choice over the `dist_<variant>` results of its variants; `cos` when none
    is surely better than the cosine), or None when none recorded held-out EERs. Uses no test result."""
    held = {f"dist_{v}": results[f"dist_{v}"] for v in train_distance.AUTO_VARIANTS if f"dist_{v}" in results}
    held = {name: found for name, found in held.items() if "valid_eer" in found}
    if not held:
        return None
    return train_distance.held_out_choice(held, min_confidence) or "cos"


def cell(found, key):
    """A table cell: a metric to 4 decimals, a step as it is, empty where the scorer has no such value."""
    if key not in found:
        return ""
    if key == "valid_confidence":
        return f"{100 * found[key]:.0f}%"
    return str(found[key]) if key == "best_step" else f"{found[key]:.4f}"


def render(record):
    """Markdown of a run's record (benchlib.publish): a row per scorer, a column per metric it has."""
    results = record["runs"]
    lines = ["| scorer | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for scorer, found in results.items():
        if "failed" in found:
            lines.append(f"| {scorer} | not trained: {found['failed']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = (cell(found, key) for _, key in COLUMNS)
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


OPTIONS = {
    "--train": dict(required=True, help="embed.py's training embeddings (embeddings.h5 / .scp or their folder)"),
    "--train-utt2spk": dict(default=None, help="Kaldi utt2spk of --train (needed for an scp)"),
    "--test": dict(required=True, help="embed.py's test embeddings (embeddings.h5 / .scp or their folder)"),
    "--test-utt2spk": dict(default=None, help="without --trials: Kaldi utt2spk of --test (needed for an scp)"),
    "--trials": dict(default=None, help="Kaldi trials file over --test's ids (default: all pairs of --test)"),
    "--variants": (
        benchlib.name_list(tuple(PAIR_FEATURES), "variant"),
        ",".join(PAIR_FEATURES),
        "learned-distance variants, comma-separated, from: " + ", ".join(PAIR_FEATURES) + " (default all)",
    ),
    "--steps": (at_least(1), None, "train_distance.py --steps (default its own)"),
    "--valid": dict(
        default=None,
        help="embed.py's embeddings of held-out classes (neither in --train nor --test) for train_distance.py "
        "--valid-embeddings, instead of --valid-classes",
    ),
    "--valid-classes": (train_distance.count_or_fraction, 0.1, "train_distance.py --valid-classes (default 0.1)"),
    "--lda-dim": (at_least(0), 0, "PLDA's LDA size (default 0: no LDA)"),
    "--seed": (at_least(0), 1, "seed of the distances' training (default 1)"),
    "--threads": (at_least(1), 2, "torch CPU threads (default 2)"),
    "--work-dir": dict(default="runs/distance_backend", help="folder of the trained back-ends (made when missing)"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.out_table("distance_backend"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = {flag: flag_value(args, flag) for flag in ("--train", "--test", "--trials", "--valid")}
    outputs = {"--work-dir plda": os.path.join(args.work_dir, "plda.json")}
    outputs.update({f"--work-dir {v}": os.path.join(args.work_dir, f"distance_{v}.pt") for v in args.variants})
    check_outputs(outputs, inputs, create=True)
    os.makedirs(args.work_dir, exist_ok=True)
    benchlib.publish(__file__, argv, args, evaluate(args), render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
