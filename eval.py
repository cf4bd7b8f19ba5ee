"""Score verification trials with the learned distance (probability and logit), cosine similarity and their
fusion, and optionally calibrated, score-normalised and PLDA back-ends.

Images: every pair of the test set is a trial. Speech: a Kaldi trials file over utterances of a
feats.scp. Prints EER, minDCF (p_target 0.01 and 0.05, C_miss = C_fa = 1) and AUC per scorer, and
Cllr, minCllr and actDCF for the scorers whose output is a log-likelihood ratio; writes one trial
per line (or a compact .npz) plus a JSON of the metrics beside it.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import os

from e2e_verification import backends, scoring
from e2e_verification.calibration import warn_checkpoint_calibration
from e2e_verification.checkpoints import ALLOW_OTHER_MODEL, ALLOW_OTHER_MODEL_HELP, load_model
from e2e_verification.tasks import task_for_model
from utils import (
    UserError,
    add_device_flags,
    check_outputs,
    check_writable_folder,
    cli,
    device_from_args,
    flag_value,
    make_parser,
)

EXAMPLE = """examples:
  python eval.py --data-path /data/test/ --model resnet --cp-path cp/checkpoint_10ep.pt --out-path scores.out
  python eval.py --test-data /data/test/feats.scp --trials-path /data/test/trials \\
      --cp-path cp/checkpoint_10ep.pt --model TDNN --out-path /results/scores.out
  python eval.py --data-path /usr/share/datasets/fashion-mnist --cp-path cp/checkpoint_10ep.pt \\
      --out-path results/fashion.npz --score-format npy
  python eval.py --test-data test/feats.scp --trials-path test/trials --cp-path cp/checkpoint_10ep.pt \\
      --calibration dev/calibration.json --out-path results/scores.out"""


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--model", default=None, help="encoder name; checked against the checkpoint when given")
    p.add_argument("--data-path", default=None, help="test images (default when no --test-data: held-out digits)")
    p.add_argument(
        "--classes", default=None, help="images: score only the test items of these classes, e.g. 5-9 or 0,2,7"
    )
    p.add_argument(
        "--items-per-class", type=int, default=None, help="images: score at most this many items of each class"
    )
    p.add_argument("--test-data", default=None, help="speech: feats.scp (or a folder holding one) or an HDF5 file")
    p.add_argument("--trials-path", default=None, help="speech: trials file, lines 'enroll test target|nontarget'")
    p.add_argument("--spk2utt", default=None, help="speech without trials: score all pairs of these utterances")
    p.add_argument(
        "--out-path",
        default=None,
        help="score file (a folder means <folder>/scores.out, or scores.npz with --score-format npy); "
        "metrics go to <file>.json",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default 64)")
    p.add_argument(
        "--min-frames", type=int, default=100, help="speech: shorter utterances are tiled to this length (default 100)"
    )
    add_device_flags(p)
    p.add_argument("--plot", action="store_true", help="also write DET curves and score histograms (PNG)")
    p.add_argument(
        "--score-format",
        choices=scoring.SCORE_FORMATS,
        default="text",
        help="text: one trial per line (default); npy: an uncompressed .npz of float32 columns, labels and ids",
    )
    p.add_argument(
        "--no-score-file", action="store_true", help="write no score file, only the metrics JSON (with --out-path)"
    )
    backends.add_arguments(p)
    p.add_argument(ALLOW_OTHER_MODEL, action="store_true", help=ALLOW_OTHER_MODEL_HELP)
    return p


def resolve_out_path(out_path, score_format="text", plot=False, inputs=None):
    """The score file's path (a folder means <folder>/scores.out, or scores.npz for --score-format npy),
    checked before any work (utils.check_outputs): neither it nor what goes beside it (`<path>.json`, with
    `plot` the PNGs) is one of the run's `inputs` ({flag: path}) or a folder, and its folder takes new files."""
    if out_path is None:
        return None
    if out_path.endswith(os.sep) or os.path.isdir(out_path):
        check_writable_folder(out_path, "--out-path")
        out_path = os.path.join(out_path, "scores.npz" if score_format == "npy" else "scores.out")
    beside = {"--out-path": out_path, "--out-path's metrics": out_path + ".json"}
    if plot:
        beside.update(
            {
                f"--plot {s.name} {kind}": f"{out_path}.{s.name}_{kind}.png"
                for s in scoring.SCORERS
                for kind in ("det", "hist")
            }
        )
    check_outputs(beside, inputs or {})
    return out_path


def input_paths(args):
    """{flag: path} of every file or folder eval.py reads."""
    flags = ("--cp-path", "--data-path", "--test-data", "--trials-path", "--spk2utt", *backends.input_flags())
    return {flag: flag_value(args, flag) for flag in flags}


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = device_from_args(args)
    out_path = resolve_out_path(args.out_path, args.score_format, args.plot, input_paths(args))
    if args.plot and out_path is None:
        raise UserError("--plot writes its PNGs beside the score file: give --out-path too")
    if args.no_score_file:
        args.score_format = None
    run_backends = backends.Backends.from_args(args)  # reads and checks every back-end file before any embedding
    model = load_model(args.cp_path, args.model, device)
    adopted = run_backends.adopt_checkpoint_calibration(model)  # cal_* columns from the checkpoint unless --calibration
    run_backends.check_model(model)
    task_for_model(model.config["model"]).evaluate(model, args, device, out_path, run_backends)
    warn_checkpoint_calibration(adopted)  # after the scores: bad input stays one line
    return 0


if __name__ == "__main__":
    cli(main)
