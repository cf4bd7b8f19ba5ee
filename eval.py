"""Score verification trials with the learned distance, cosine similarity and their fusion.

Images: every pair of the test set is a trial. Speech: a Kaldi trials file over utterances of a
feats.scp. Prints EER, minDCF (p_target 0.01 and 0.05, C_miss = C_fa = 1) and AUC per scorer,
and writes one trial per line plus a JSON of the metrics beside it.
"""

import argparse
import os

from checkpoints import load_model
from tasks import task_for_model
from utils import (
    ArgumentParser,
    UserError,
    add_device_flags,
    cli,
    device_from_args,
)

EXAMPLE = """examples:
  python eval.py --data-path /data/test/ --model resnet --cp-path cp/checkpoint_10ep.pt --out-path scores.out
  python eval.py --test-data /data/test/feats.scp --trials-path /data/test/trials \\
      --cp-path cp/checkpoint_10ep.pt --model TDNN --out-path /results/scores.out"""


def build_parser():
    p = ArgumentParser(description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "--out-path", default=None, help="score file (a folder means <folder>/scores.out); metrics go to <file>.json"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default 64)")
    p.add_argument(
        "--min-frames", type=int, default=100, help="speech: shorter utterances are tiled to this length (default 100)"
    )
    add_device_flags(p)
    p.add_argument("--plot", action="store_true", help="also write DET curves and score histograms (PNG)")
    return p


def resolve_out_path(out_path):
    if out_path is None:
        return None
    if out_path.endswith(os.sep) or os.path.isdir(out_path):
        if not os.path.isdir(out_path):
            raise UserError(f"output folder does not exist: {out_path}")
        return os.path.join(out_path, "scores.out")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    return out_path


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = device_from_args(args)
    out_path = resolve_out_path(args.out_path)
    if args.plot and out_path is None:
        raise UserError("--plot writes its PNGs beside the score file: give --out-path too")
    model = load_model(args.cp_path, args.model, device)
    task_for_model(model.config["model"]).evaluate(model, args, device, out_path)
    return 0


if __name__ == "__main__":
    cli(main)
