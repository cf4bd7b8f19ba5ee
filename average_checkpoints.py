"""Average the weights of N checkpoints of one model into one checkpoint (as WeSpeaker's average_model).

Give either --checkpoint-path DIR --last N (the N highest-epoch checkpoint_<k>ep.pt files train.py wrote in
DIR) or the checkpoint files themselves. Floating-point weights are averaged (in float64, then cast back to
their dtype); integer tensors (BatchNorm's num_batches_tracked) take the value of the last checkpoint: the
last file given, or the highest epoch with --last. All inputs must hold the same model (model_config, weight
names, shapes and dtypes). The output, written atomically, is a checkpoint that eval.py, embed.py, export.py
and verify.py take as --cp-path; it keeps the last input's model_config (front end included), epoch, history
and training arguments, records under `averaged` which checkpoints made it (paths, epochs, weight hashes), and
holds no optimizer or scheduler state: training cannot be resumed from it (--pretrained-path fine-tunes it).
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import os

from e2e_verification.averaging import EPOCH_FILE, last_checkpoints, write_average
from utils import UserError, check_outputs, cli, make_parser

EXAMPLE = """example:
  python average_checkpoints.py --checkpoint-path cp/ --last 5 --out cp/avg_last5.pt
  python average_checkpoints.py --out cp/avg.pt cp/checkpoint_8ep.pt cp/checkpoint_9ep.pt cp/checkpoint_10ep.pt
  python embed.py --data data/test/feats.scp --cp-path cp/avg_last5.pt --out-path exp/embeddings/"""


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    p.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="checkpoint files to average (instead of --checkpoint-path/--last)",
    )
    p.add_argument(
        "--checkpoint-path", default=None, metavar="DIR", help="folder of train.py's checkpoint_<k>ep.pt files"
    )
    p.add_argument(
        "--last", type=int, default=None, metavar="N", help="average the N highest-epoch checkpoints of the folder"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output checkpoint file (not one of the inputs)")
    return p


def inputs_of(args):
    """The checkpoint paths to average, from exactly one of the two forms (folder + --last, or files)."""
    folder_form = args.checkpoint_path is not None or args.last is not None
    if folder_form and args.checkpoints:
        raise UserError("give either --checkpoint-path DIR --last N or checkpoint files, not both")
    if folder_form and (args.checkpoint_path is None or args.last is None):
        raise UserError("--checkpoint-path and --last go together: --checkpoint-path DIR --last N")
    if folder_form:
        return last_checkpoints(args.checkpoint_path, args.last)
    if not args.checkpoints:
        raise UserError("no checkpoints to average: give --checkpoint-path DIR --last N, or checkpoint files")
    return args.checkpoints


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    paths = inputs_of(args)
    check_outputs({"--out": args.out}, [("a checkpoint to average", p) for p in paths])
    if EPOCH_FILE.match(os.path.basename(args.out)):
        raise UserError(
            f"--out {args.out} is named as a training epoch's checkpoint, which --last, resuming and "
            "--keep-checkpoints would take for one; name it otherwise (e.g. avg_last5.pt)"
        )
    state = write_average(paths, args.out)
    epochs = ", ".join("?" if r["epoch"] is None else str(r["epoch"]) for r in state["averaged"]["checkpoints"])
    print(
        f"averaged {len(paths)} checkpoints (epochs {epochs}) of a {state['model_config']['model']} model: wrote "
        f"{args.out} (weights {state['averaged']['weights_sha256']}; no optimizer state, so not resumable)"
    )
    return 0


if __name__ == "__main__":
    cli(main)
