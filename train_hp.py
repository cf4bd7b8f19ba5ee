"""One trial of the cluster hyperparameter search: train with the given flags, write the objective.

Takes train.py's flags as run_hp_slurm.sh passes them (the seed's `--cuda True/False`; the string
'None' means no value, e.g. `--logdir None` or `--train-hdf-file None` for the built-in digits), plus
--out-file. Checkpoints go to <checkpoint-path>/<cp-name> when validation improves. The objective, the
best validation e2e EER, is written to --out-file as one number (temporary name, then renamed); any
failure exits non-zero and writes nothing.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import argparse
import os
import sys

from e2e_verification import hp_space, training
from utils import atomic_write, check_outputs, cli

EXAMPLE = """example (one trial, as run_hp_slurm.sh starts it):
  python train_hp.py --train-hdf-file data/train.hdf --valid-hdf-file data/valid.hdf --model TDNN \\
      --lr 1.5 --epochs 5 --checkpoint-path cp/ --cp-name trial_3.pt --out-file temp/trial_3.out"""


def build_parser():
    p = training.extended_parser(__doc__, EXAMPLE)
    p.add_argument("--out-file", default="objective.txt", help="where the objective goes (default objective.txt)")
    # The seed's train_hp.py frame default; checkpoints only when validation improves (and at the end).
    p.set_defaults(n_frames=800, save_every=sys.maxsize)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = build_parser().parse_args(argv)
    args = argparse.Namespace(**{k: None if v == "None" else v for k, v in vars(parsed).items()})
    flags = ("train_hdf_file", "valid_hdf_file", "data_path", "valid_data_path", "pretrained_path")
    inputs = {"--" + name.replace("_", "-"): getattr(args, name, None) for name in flags}
    if args.cp_name:
        inputs["--checkpoint-path/--cp-name"] = os.path.join(args.checkpoint_path or ".", args.cp_name)
    check_outputs({"--out-file": args.out_file}, inputs)
    if args.logdir and args.cp_name:
        args.logdir = os.path.join(args.logdir, os.path.splitext(args.cp_name)[0])
    best = hp_space.train_objective(args, argv)
    with atomic_write(args.out_file) as handle:
        handle.write(f"{best['e2e']!r}\n")
    print(f"objective (best validation e2e EER) {best['e2e']:.6f} written to {args.out_file}", flush=True)
    return 0


if __name__ == "__main__":
    cli(main)
