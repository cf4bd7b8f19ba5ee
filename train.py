"""Train an encoder jointly with an AM-softmax classifier and a learned distance (images or speech).

With no arguments it runs the embedded demo: scikit-learn's handwritten digits, then an all-pairs
evaluation of the held-out digits with e2e, cosine and fused scores.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import os
import signal
import sys
import threading

import torch.distributed as dist

from e2e_verification import training
from e2e_verification.training import build, fit, init_distributed
from utils import cli

EXAMPLE = """example:
  python train.py --checkpoint-path cp --data-path /data/cifar --valid-data-path /data/cifar \\
      --model resnet --batch-size 128 --lr 1e-2 --epochs 600 --softmax am_softmax --smoothing 0.05"""


def build_parser():
    """train.py's command line: every training flag (training.build_parser), with this script's help."""
    return training.build_parser(description=__doc__, epilog=EXAMPLE)


def stop_on_usr1():
    """SIGUSR1, Slurm's warning before a time limit (sbatch --signal=USR1@60), stops training as SIGTERM does
    (utils.cli: temporary outputs removed, exit 143); a requeued job resumes with --checkpoint-epoch last."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, signal.getsignal(signal.SIGTERM) or signal.SIG_DFL)


def main(argv=None):
    stop_on_usr1()
    parser = build_parser()
    # resolve_defaults reads which flags were given, those of a recipe (@recipes/x.args) included
    argv = parser.expand_arg_files(sys.argv[1:] if argv is None else argv)
    parsed = parser.parse_args(argv)
    rank, world_size, device = init_distributed(parsed)
    try:
        run = fit(build(parsed, argv, device, rank, world_size))
        if world_size > 1:
            dist.barrier()
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    model = run.model.module if world_size > 1 else run.model
    best = run.trainer.best_summary() if rank == 0 else None
    if best is not None:
        print(best, flush=True)
    test = run.task.final_test(run.args) if rank == 0 else None
    if test is not None:
        from e2e_verification.scoring import run_image_eval

        out = os.path.join(run.args.checkpoint_path, "test_scores.txt")
        run_image_eval(model, test, run.trainer.device, run.args.valid_batch_size, out, run.args.amp, verbose=True)
    return 0


if __name__ == "__main__":
    cli(main)
