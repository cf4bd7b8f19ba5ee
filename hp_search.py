"""Hyperparameter search with nevergrad; the trials run one after another in this process.

Every train.py flag is accepted and held fixed; the search varies the hyperparameters of the data kind
(hp_space.py) and scores each trial by its best validation e2e EER. Trials are recorded in
<checkpoint-path>/hp_trials.jsonl and train in <checkpoint-path>/trial_NNNN; the best is saved to
<checkpoint-path>/hp_best.json. Run the same command again to resume a stopped search.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import os
import sys

import torch

from e2e_verification import hp_space, training
from utils import cli, user_message

EXAMPLE = """--model all searches the encoder too; --optimizer RandomSearch samples as the seed did.

example (the seed's):
  python hp_search.py --batch-size 128 --valid-batch-size 128 --model resnet --budget 40 \\
      --checkpoint-path /path/to/cp/ --epochs 600 --data-path /data/mini-imagenet/train \\
      --valid-data-path /data/mini-imagenet/val"""

# Whatever a trial's training raises (a NaN loss is a UserError, running out of memory a RuntimeError,
# an unreadable file an OSError) fails that trial only: it is recorded as failed, told to the optimizer
# as FAILED_LOSS, and the search goes on. Ctrl-C and SIGTERM (not Exceptions) stop the search.
TRIAL_ERRORS = (Exception,)


def build_parser():
    """train.py's parser plus the search flags; returns (parser, the search flags' actions)."""
    p = training.extended_parser(__doc__, EXAMPLE)
    return p, hp_space.add_search_flags(p, budget=100)


class SerialTrials:
    """One trial in this process: train.py's code path with the trial's flags, in its own checkpoint folder."""

    def __init__(self, train_argv, base):
        self.train_argv = train_argv
        self.base = base

    def command(self, trial, params):
        """The train.py arguments of a trial: the fixed flags, then the trial's (the last value wins)."""
        name = f"trial_{trial:04d}"
        own = ["--checkpoint-path", os.path.join(self.base.checkpoint_path, name)]
        if self.base.logdir:
            own += ["--logdir", os.path.join(self.base.logdir, name)]
        values = hp_space.training_values(params, self.base)
        return ["--keep-checkpoints", "1", *self.train_argv, *hp_space.flags(values), *own]

    def __call__(self, trial, params):
        argv = self.command(trial, params)
        print(f"trial {trial}: train.py {' '.join(argv)}", flush=True)
        try:
            best = hp_space.train_objective(training.build_parser().parse_args(argv), argv)
        except TRIAL_ERRORS as err:
            return {"status": "failed", "error": f"{type(err).__name__}: {user_message(err)}", "command": argv}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return {"status": "ok", "objective": best["e2e"], "cos_eer": best["cos"], "command": argv}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, own = build_parser()
    args = parser.parse_args(argv)
    train_argv = hp_space.training_argv(argv, own)
    base, search_models = hp_space.resolve_base(train_argv)
    spec = hp_space.space_spec(base, search_models, args.rproj)
    header = {
        "script": "hp_search",
        "train_argv": train_argv,
        "space": spec,
        "optimizer": args.optimizer,
        "seed": base.seed,
        "workers": 1,
        "budget": args.budget,
    }
    optimizer = hp_space.make_optimizer(args.optimizer, spec, args.budget, 1, base.seed)
    log = hp_space.TrialLog(base.checkpoint_path)
    best = hp_space.run_search(log, header, optimizer, args.budget, 1, SerialTrials(train_argv, base))
    return hp_space.finish(best, log, args.budget)


if __name__ == "__main__":
    cli(main)
