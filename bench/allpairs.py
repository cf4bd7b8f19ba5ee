"""All-pairs scoring: the split first layer (scoring.score_all_pairs) against the concatenated form.

The discriminator's first layer on a pair [a; b] equals W_a a + W_b b + bias, so the split form
projects every embedding once and only adds per pair; the baseline concatenates each pair's
embeddings and runs the whole MLP on them (LearnedDistance.forward), in chunks of the same number
of pairs. Both score the N(N-1)/2 pairs of N random embeddings (default d=512, MLP 3x350); the
metrics of the split scores (EER and minDCF from one sort) are timed too.
"""

import os

import benchlib
import torch
from benchlib import at_least, seconds, speed_ratio  # noqa: E402

from e2e_verification.metrics import compute_metrics
from e2e_verification.scoring import pair_chunk, score_all_pairs
from models.verifier import LearnedDistance
from utils import cli

EXAMPLE = """example:
  python bench/allpairs.py --device cpu --n 2000
  python bench/allpairs.py --device cuda --n 10000 --amp"""


@torch.no_grad()
def concatenated_all_pairs(distance, emb, amp=False):
    """Baseline: e2e scores (pairs,) of all i < j pairs in itertools.combinations order, each pair concatenated."""
    distance.eval()
    n, device = len(emb), emb.device
    idx_a, idx_b = torch.triu_indices(n, n, 1, device=device)
    step = pair_chunk(distance, device)
    out = torch.empty(len(idx_a), device=device)
    for start in range(0, len(idx_a), step):
        a, b = idx_a[start : start + step], idx_b[start : start + step]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = distance(emb[a], emb[b])
        out[start : start + step] = torch.sigmoid(logits.float()).mean(0)
    return out


OPTIONS = {
    "--n": (at_least(2), None, "embeddings, at least 2 (default 2000 on the CPU, 10000 on a GPU)"),
    "--emb-size": (at_least(1), 512, "embedding size d (default 512)"),
    "--hidden-size": (at_least(1), 350, "discriminator width (default 350)"),
    "--n-hidden": (at_least(1), 3, "discriminator hidden layers (default 3)"),
    "--ndiscriminators": (at_least(1), 1, "discriminator heads (default 1)"),
    "--pair-features": dict(
        choices=("concat", "sym"),
        default="concat",
        help="the learned distance timed in its projected (split) form; the baseline is always the research "
        "code's concatenated per-pair MLP of the same width (default concat)",
    ),
    "--classes": (at_least(2), 10, "classes the embeddings are drawn from (default 10)"),
    "--amp": ("bf16 autocast for both forms",),
    "--tf32": ("allow TF32 matmuls on CUDA for both forms",),
    "--no-baseline": ("time the split form only",),
    **benchlib.out_perf("allpairs", " (allpairs_sym.json with --pair-features sym), results/perf/ beside the page"),
}


def json_name(pair_features):
    """The JSON of the table, relative to the page's folder: one per pair-features form."""
    return os.path.join("results", "perf", "allpairs.json" if pair_features == "concat" else "allpairs_sym.json")


def render(record):
    """Markdown: the row of the performance table (what and command, ours, baseline, ratio) of each run."""
    lines = ["| what (command) | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in record["runs"]:
        what = (
            f"learned-distance scores of all {r['pairs']:,} pairs of {r['n']:,} embeddings (d={r['emb_size']}, "
            f"MLP {r['n_hidden']}×{r['hidden_size']}, pair features {r['pair_features']}) — `{record['command']}`"
        )
        ours = f"projected (split) first layer: {seconds(r['split_s'])} (+ EER and minDCF: {seconds(r['metrics_s'])})"
        if r["concat_s"] is None:
            lines.append(f"| {what} | {ours} | not run (--no-baseline) | — |")
            continue
        baseline = f"each pair concatenated through the whole MLP: {seconds(r['concat_s'])}"
        same = f"same scores to {r['max_diff']:.1e}"
        lines.append(f"| {what} | {ours} | {baseline} | {speed_ratio(r['concat_s'], r['split_s'])} ({same}) |")
    return "\n".join(lines) + "\n"


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.DEVICE)


def make_inputs(args, device):
    """Random embeddings from --classes centres and the timed learned distance: -> (emb, labels, distance,
    baseline), the baseline being the research code's concatenated MLP of the same width."""
    n = args.n if args.n is not None else 10_000 if device.type == "cuda" else 2_000
    torch.manual_seed(0)
    labels = torch.randint(0, args.classes, (n,), device=device)
    centres = torch.randn(args.classes, args.emb_size, device=device)
    emb = centres[labels] + torch.randn(n, args.emb_size, device=device)
    width = (args.emb_size, args.hidden_size, args.n_hidden, 0.25, args.ndiscriminators)
    distance = LearnedDistance(*width, pair_features=args.pair_features).to(device).eval()
    baseline = distance if args.pair_features == "concat" else LearnedDistance(*width).to(device).eval()
    return emb, labels, distance, baseline


def measure(args, device):
    """Time both forms and the metrics, print them; -> the run (sizes, seconds, max difference) for the table."""
    emb, labels, distance, baseline = make_inputs(args, device)
    n = len(emb)
    pairs = n * (n - 1) // 2
    print(benchlib.describe(device))
    print(
        f"{n} embeddings of size {args.emb_size}, {pairs} pairs, MLP {args.n_hidden}x{args.hidden_size}, "
        f"{args.ndiscriminators} head(s), pair features {args.pair_features}, amp {args.amp}, tf32 {args.tf32}"
    )
    fns = {"split": lambda: score_all_pairs(distance, emb, labels, amp=args.amp)}
    if not args.no_baseline:
        fns["concatenated"] = lambda: concatenated_all_pairs(baseline, emb, args.amp)
    times = benchlib.best_times(fns, device, args.repeats, warmup=1 if device.type == "cuda" else 0)
    split_s, (scores, target) = times["split"]
    metrics_s, metrics = benchlib.best_time(lambda: compute_metrics(scores["e2e"], target), device, args.repeats)
    print(f"split form (e2e, cosine and fused scores): {split_s:.4f} s ({pairs / split_s / 1e6:.2f} M pairs/s)")
    print(f"EER + minDCF(0.01, 0.05) of {pairs} scores: {metrics_s:.4f} s (EER {metrics['eer']:.4f})")
    print(f"split scoring + metrics: {split_s + metrics_s:.4f} s")
    sizes = {k: getattr(args, k) for k in ("emb_size", "hidden_size", "n_hidden", "ndiscriminators", "pair_features")}
    run = {"device": benchlib.describe(device), "n": n, "pairs": pairs, **sizes, "amp": args.amp, "tf32": args.tf32}
    run.update(split_s=split_s, metrics_s=metrics_s, concat_s=None, max_diff=None)
    if args.no_baseline:
        return run
    concat_s, concat = times["concatenated"]
    if baseline is not distance:  # exactness against this variant's own naive per-pair form (untimed)
        concat = concatenated_all_pairs(distance, emb, args.amp)
    diff = float((concat - scores["e2e"]).abs().max())
    print(
        f"concatenated form (e2e only): {concat_s:.4f} s ({pairs / concat_s / 1e6:.2f} M pairs/s); "
        f"max |split - concatenated| {diff:.2e}"
        + (" (against the sym head's own per-pair form)" if baseline is not distance else "")
    )
    print(benchlib.ratio_line("all-pairs scoring, split", split_s, "concatenated", concat_s))
    print(benchlib.ratio_line("scoring + metrics, split", split_s + metrics_s, "concatenated", concat_s + metrics_s))
    return {**run, "concat_s": concat_s, "max_diff": diff}


def main(argv=None):
    args, device = benchlib.start(build_parser(), argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = json_name(args.pair_features)
    if args.out:  # the JSON's folder, made before the work (the page's own folder is checked while parsing)
        benchlib.make_folder(os.path.dirname(os.path.join(os.path.dirname(os.path.abspath(args.out)), name)), "--out")
    benchlib.publish(__file__, argv, args, [measure(args, device)], render, args.out, name)
    return 0


if __name__ == "__main__":
    cli(main)
