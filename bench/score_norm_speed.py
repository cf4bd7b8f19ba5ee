"""AS-norm of many trials: score_norm.snorm_trials (each item scored against the cohort once, in blocks)
against the direct per-trial form (NumPy, float64: for every trial, the enroll and the test item are
scored against the whole cohort again, their top-N scores picked, the formula applied).

Default: 100,000 random trials over 2,000 enroll and 2,000 test embeddings (d=256), a 5,000-item
cohort, top 300, cosine scores. The direct form is too slow to run on every trial: it is timed on the
first --direct-trials trials and its time scaled to all of them (it costs the same per trial), and
both forms' outputs on those trials are compared.
"""

import benchlib
import numpy as np
import torch
from benchlib import at_least, seconds, speed_ratio  # noqa: E402

from e2e_verification.score_norm import cosine_block, snorm_trials
from utils import cli

EXAMPLE = """example:
  python bench/score_norm_speed.py --device cpu
  python bench/score_norm_speed.py --device cuda --direct-trials 50"""


def direct_asnorm(raw, enroll, test, enroll_idx, test_idx, cohort, top_n=None):
    """Baseline: one trial at a time, both items' cosine scores against the cohort recomputed -> (T,) float64."""
    out = np.empty(len(raw))
    for k in range(len(raw)):
        sides = []
        for item in (enroll[enroll_idx[k]], test[test_idx[k]]):
            cohort_norms = np.linalg.norm(cohort, axis=1)
            scores = cohort @ item / (cohort_norms * np.linalg.norm(item))
            if top_n is not None and top_n < len(scores):
                scores = np.partition(scores, len(scores) - top_n)[-top_n:]
            sides.append((raw[k] - scores.mean()) / scores.std())
        out[k] = 0.5 * (sides[0] + sides[1])
    return out


OPTIONS = {
    "--trials": (at_least(1), 100_000, "trials (default 100000)"),
    "--enroll": (at_least(1), 2_000, "enroll embeddings (default 2000)"),
    "--test": (at_least(1), 2_000, "test embeddings (default 2000)"),
    "--cohort": (at_least(2), 5_000, "cohort size, at least 2 (default 5000)"),
    "--emb-size": (at_least(1), 256, "embedding size d (default 256)"),
    "--top-n": (at_least(0), 300, "AS-norm top N, 2 to --cohort; 0 means S-norm over the whole cohort (300)"),
    "--direct-trials": (at_least(1), 200, "trials the direct form is timed on, at most --trials (200)"),
    **benchlib.out_perf("score_norm_speed"),
}
JSON_NAME = benchlib.perf_json("score_norm_speed")


def render(record):
    """Markdown: the row of the performance table (what and command, ours, baseline, ratio)."""
    lines = ["| what (command) | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in record["runs"]:
        norm = f"AS-norm (top {r['top_n']})" if r["top_n"] else "S-norm (whole cohort)"
        what = (
            f"{norm} of {r['trials']:,} trials against a {r['cohort']:,}-item cohort, cosine, d={r['emb_size']} "
            f"— `{record['command']}`"
        )
        ours = f"vectorised, each item scored against the cohort once: {seconds(r['fast_s'])}"
        baseline = (
            f"per-trial loop, timed on {r['direct_trials']:,} trials ({seconds(r['direct_sub_s'])}) and scaled: "
            f"{seconds(r['direct_s'])}"
        )
        same = f"same scores to {r['max_diff']:.1e}"
        lines.append(f"| {what} | {ours} | {baseline} | {speed_ratio(r['direct_s'], r['fast_s'])} ({same}) |")
    return "\n".join(lines) + "\n"


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.DEVICE)


def measure(args, device):
    """Time both forms on random embeddings, print them; -> the run for the table."""
    top_n = args.top_n or None
    rng = np.random.default_rng(0)
    enroll = rng.standard_normal((args.enroll, args.emb_size), dtype=np.float32)
    test = rng.standard_normal((args.test, args.emb_size), dtype=np.float32)
    cohort = rng.standard_normal((args.cohort, args.emb_size), dtype=np.float32)
    enroll_idx = rng.integers(0, args.enroll, args.trials)
    test_idx = rng.integers(0, args.test, args.trials)
    raw = np.einsum("ij,ij->i", enroll[enroll_idx], test[test_idx]) / (
        np.linalg.norm(enroll[enroll_idx], axis=1) * np.linalg.norm(test[test_idx], axis=1)
    )
    print(benchlib.describe(device))
    print(
        f"{args.trials} trials over {args.enroll} enroll and {args.test} test embeddings of size {args.emb_size}, "
        f"cohort {args.cohort}, {'top ' + str(top_n) if top_n else 'whole cohort (S-norm)'}, cosine scores"
    )
    tensors = [torch.from_numpy(a).to(device) for a in (raw, enroll, test, enroll_idx, test_idx, cohort)]

    def vectorised():
        raw_t, enroll_t, test_t, ei, ti, cohort_t = tensors
        return snorm_trials(raw_t, enroll_t, test_t, ei, ti, cohort_t, cosine_block, top_n)

    sub = min(args.direct_trials, args.trials)
    raw64, enroll64, test64, cohort64 = (a.astype(np.float64) for a in (raw[:sub], enroll, test, cohort))

    def direct():
        return direct_asnorm(raw64, enroll64, test64, enroll_idx[:sub], test_idx[:sub], cohort64, top_n)

    times = benchlib.best_times({"vectorised": vectorised, "direct": direct}, device, args.repeats, warmup=0)
    fast_s, normed = times["vectorised"]
    direct_sub_s, expected = times["direct"]
    direct_s = direct_sub_s * args.trials / sub
    diff = float(np.abs(normed[:sub].cpu().numpy() - expected).max())
    print(f"vectorised: {fast_s:.4f} s ({args.trials / fast_s:,.0f} trials/s)")
    print(
        f"direct per trial: {direct_sub_s:.4f} s on {sub} trials, scaled to {args.trials}: {direct_s:.2f} s; "
        f"max |vectorised - direct| {diff:.2e}"
    )
    print(benchlib.ratio_line("AS-norm of all trials, vectorised", fast_s, "direct (scaled)", direct_s))
    sizes = {k: getattr(args, k) for k in ("trials", "enroll", "test", "cohort", "emb_size", "top_n")}
    run = dict(device=benchlib.describe(device), **sizes, direct_trials=sub, fast_s=fast_s)
    return {**run, "direct_sub_s": direct_sub_s, "direct_s": direct_s, "max_diff": diff}


def main(argv=None):
    args, device = benchlib.start(build_parser(), argv)
    if args.out:  # the JSON's folder, made before the work (the page's own folder is checked while parsing)
        benchlib.make_json_folder(args.out, JSON_NAME)
    benchlib.publish(__file__, argv, args, [measure(args, device)], render, args.out, JSON_NAME)
    return 0


if __name__ == "__main__":
    cli(main)
