"""Fit score calibration (and fusion) on development trials: scores -> log-likelihood ratios.

Reads a development score file written by eval.py (text or .npz; only the columns it fits, ~9 bytes a
trial for two), fits llr = a * score + b for each scorer and llr = w . scores + b for each fusion
(prior-weighted logistic regression at --p-target), prints the development Cllr, minCllr, actDCF and
minDCF before and after, and writes the parameters as JSON,
which calibration.load_calibration / apply_calibration apply to evaluation scores, with the provenance
(the model) the score file records. Calibrated columns are named cal_<scorer> and cal_<a>+<b>.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import numpy as np

from e2e_verification.calibration import (
    PREFIX,
    ScoreTable,
    check_p_target,
    fit_calibration,
    read_scores,
    score_file_names,
)
from e2e_verification.streaming_metrics import table_metrics
from utils import UserError, check_outputs, cli, make_parser, write_json

EXAMPLE = """examples:
  python calibrate.py --scores dev/scores.out --out dev/calibration.json
  python calibrate.py --scores dev/scores.out --out cal.json --p-target 0.05 --scorers cos --fuse e2e_logit,cos"""
NOT_LLR_LIKE = ("e2e", "fus")  # a probability and an uncalibrated fusion: not calibrated unless asked for


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    p.add_argument("--scores", required=True, help="development score file written by eval.py (text or .npz)")
    p.add_argument("--out", required=True, help="calibration parameters (JSON), written atomically")
    p.add_argument("--p-target", type=float, default=0.01, help="target prior the fit aims at (default 0.01)")
    p.add_argument(
        "--scorers", nargs="+", default=None, help="score columns to calibrate alone (default all but e2e and fus)"
    )
    p.add_argument(
        "--fuse",
        nargs="*",
        default=None,
        metavar="A,B",
        help="comma-separated columns to fuse, one group per value (default e2e_logit,cos when both exist; "
        "--fuse with no value: no fusion)",
    )
    return p


def choose_columns(names, scorers, fuse):
    """(scorers, fusions) asked for, or the defaults, checked against the score file's column names."""
    if scorers is None:
        scorers = [name for name in names if name not in NOT_LLR_LIKE]
    if fuse is None:
        fusions = [["e2e_logit", "cos"]] if {"e2e_logit", "cos"} <= set(names) else []
    else:
        fusions = [group.split(",") for group in fuse]
    for name in list(scorers) + [n for group in fusions for n in group]:
        if name not in names:
            raise UserError(f"the score file has no column {name!r} (it has: {', '.join(names)})")
    if not scorers and not fusions:
        raise UserError("nothing to calibrate: give --scorers or --fuse")
    return list(dict.fromkeys(scorers)), fusions


def report(table, names, p_target):
    """{column: {cllr, min_cllr, act_dcf_<p>, min_dcf_<p>}} at p_target (unit costs) of a ScoreTable's columns
    `names`, one at a time in ~4 bytes a trial (streaming_metrics)."""
    out = {}
    for name in names:
        metrics = table_metrics(table, [name], name, (p_target,), llr=True)
        keys = ("cllr", "min_cllr", f"act_dcf_{p_target:g}")
        out[name] = {**{k: metrics[k] for k in keys}, f"min_dcf_{p_target:g}": metrics[f"mindcf_{p_target:g}"]}
    return out


def format_report(title, results):
    """An aligned text table of report()'s results under a title line."""
    names = list(next(iter(results.values())))
    width = max(8, *(len(k) for k in results)) + 2
    rows = [title, f"{'scorer':<{width}}" + "".join(f"{n:>14}" for n in names)]
    for scorer, metrics in results.items():
        rows.append(f"{scorer:<{width}}" + "".join(f"{metrics[n]:>14.4f}" for n in names))
    return "\n".join(rows)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_p_target(args.p_target, "--p-target")
    check_outputs({"--out": args.out}, {"--scores": args.scores})
    names, provenance = score_file_names(args.scores)
    scorers, fusions = choose_columns(names, args.scorers, args.fuse)
    used = scorers + [name for group in fusions for name in group]
    scores = read_scores(args.scores, used, dtype=np.float32)  # float32: as eval.py scored them
    params = fit_calibration(scores.columns, scores.labels, args.p_target, fusions=fusions, scorers=scorers)
    table = ScoreTable(scores.columns, scores.labels, params)
    before = report(table, scorers, args.p_target)
    after = report(table, [PREFIX + name for name in (*params["calibrations"], *params["fusions"])], args.p_target)
    print(f"{len(table)} development trials ({table.n_targets} targets), p_target {args.p_target:g}")
    if before:
        print(format_report("before (raw scores read as LLRs):", before))
    print(format_report("after calibration:", after))
    record = {"provenance": provenance, "dev_scores": args.scores, "dev_metrics": {**before, **after}}
    write_json(args.out, {**params, **record})
    print(f"calibration: {args.out}")
    return 0


if __name__ == "__main__":
    cli(main)
