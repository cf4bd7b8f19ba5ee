"""Hyperparameter search with nevergrad; the trials run as parallel Slurm (or Grid Engine) jobs.

Each trial submits --sub-file with the 27 positional arguments of the seed's run_hp_slurm.sh
(hp_space.SUBMIT_FIELDS) through `sbatch --wait` (or `qsub -sync y` with --scheduler sge); the job's
train_hp.py writes the objective to an out-file in --temp-folder, where the job log goes too. Up to
--hp-workers trials are in flight. A job that fails, is cancelled or writes no out-file is a failed
trial: recorded, told to the optimizer, and the search goes on. Trials are recorded in
<checkpoint-path>/hp_trials.jsonl (job ids included), the best in hp_best.json; run the same command
again to resume a stopped search (jobs it left running are cancelled first).
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid

from e2e_verification import hp_space, training
from utils import UserError, cli

REPO = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = """--model all searches the encoder too; --rproj the random-projection size.

example (the seed's):
  python hp_search_slurm.py --train-hdf-file /data/train.hdf --valid-hdf-file /data/test.hdf \\
      --sub-file run_hp_slurm.sh --temp-folder temp_vox --workers 6 --batch-size 24 \\
      --valid-batch-size 24 --epochs 6 --budget 45 --model TDNN --ncoef 30 --hp-workers 15 \\
      --checkpoint-path /path/to/cp --logdir /path/to/logs/"""

SCHEDULERS = {
    "slurm": {"sub_file": "run_hp_slurm.sh", "cancel": "scancel", "job_id": r"Submitted batch job (\d+)"},
    "sge": {"sub_file": "run_hp_sge.sh", "cancel": "qdel", "job_id": r"Your job (\d+) "},
}
# qsub writes its "Your job N" line only at exit when stdout is a pipe; stdbuf makes it arrive at once.
LINE_BUFFERED = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
# Training flags that need not reach the jobs: the search's own (seed, checkpoint path) or carried as --cuda.
NOT_CARRIED_OK = {"seed", "save_every", "checkpoint_path", "no_cuda", "cuda", "device", "verbose"}


def build_parser():
    """train.py's parser plus the search and cluster flags; returns (parser, the added flags' actions)."""
    p = training.extended_parser(__doc__, EXAMPLE)
    own = hp_space.add_search_flags(p, budget=30)
    g = p.add_argument_group("cluster")
    own += [
        g.add_argument("--sub-file", help="submit script (default run_hp_slurm.sh; run_hp_sge.sh with sge)"),
        g.add_argument("--temp-folder", default="temp", help="trial out-files and job logs (default temp)"),
        g.add_argument("--hp-workers", type=training.positive(int), default=1, help="trials in flight (default 1)"),
        g.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="slurm", help="sbatch --wait or qsub -sync y"),
    ]
    return p, own


def check_carried(train_argv):
    """Refuse training flags a job would never see: the submit script passes only its 27 arguments."""
    parser = training.build_parser()
    given, default = vars(parser.parse_args(train_argv)), vars(parser.parse_args([]))
    lost = [k for k, v in given.items() if v != default[k] and k not in hp_space.SUBMIT_FIELDS + tuple(NOT_CARRIED_OK)]
    if lost:
        names = ", ".join("--" + k.replace("_", "-") for k in sorted(lost))
        raise UserError(
            f"the submit script cannot pass {names} to its jobs (it carries {len(hp_space.SUBMIT_FIELDS)} "
            "arguments: see run_hp_slurm.sh); use hp_search.py, or drop them"
        )


def fixed_values(base):
    """The submit values every trial shares, from the resolved training flags; paths made absolute."""
    values = {f: getattr(base, f) for f in hp_space.SUBMIT_FIELDS if hasattr(base, f)}
    values["cuda"] = not (base.no_cuda or base.cuda is False or str(base.device or "").startswith("cpu"))
    for key in ("train_hdf_file", "valid_hdf_file", "checkpoint_path", "logdir"):
        if values[key] is not None:
            values[key] = os.path.abspath(values[key])
    return values


@dataclasses.dataclass
class ClusterTrials:
    """Runs a trial as one job: submit, wait, read the out-file. Job ids go to the trial log as they appear."""

    scheduler: str  # slurm or sge
    sub_file: str
    temp_folder: str
    fixed: dict  # the submit values every trial shares (fixed_values)
    base: object  # the resolved training arguments
    log: hp_space.TrialLog
    jobs: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def command(self, trial, values, log_file):
        """The submit command, an argument list (never a shell string)."""
        name = f"hp_trial_{trial}"
        if self.scheduler == "slurm":
            opts = ["sbatch", "--wait", f"--job-name={name}", f"--output={log_file}"]
        else:
            opts = ["qsub", "-sync", "y", "-N", name, "-o", log_file, "-j", "y"]
        return [*opts, self.sub_file, *hp_space.submit_args(values)]

    def submit(self, trial, cmd):
        """Run the blocking submit command; returns (exit status, job id or None, its output lines)."""
        proc = subprocess.Popen(
            [*LINE_BUFFERED, *cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines, job_id = [], None
        for line in proc.stdout:
            lines.append(line.rstrip())
            found = re.search(SCHEDULERS[self.scheduler]["job_id"], line)
            if job_id is None and found:
                job_id = found.group(1)
                with self.lock:
                    self.jobs[trial] = job_id
                self.log.append({"event": "job", "trial": trial, "job_id": job_id})
        status = proc.wait()
        with self.lock:
            self.jobs.pop(trial, None)
        return status, job_id, lines

    def __call__(self, trial, params):
        stem = os.path.join(self.temp_folder, f"trial_{trial:04d}-{uuid.uuid4().hex[:8]}")
        values = {**self.fixed, **hp_space.training_values(params, self.base)}
        values.update(out_file=stem + ".objective", cp_name=f"trial_{trial:04d}.pt")
        cmd = self.command(trial, values, stem + ".log")
        status, job_id, lines = self.submit(trial, cmd)
        result = {"job_id": job_id, "command": cmd, "log": stem + ".log"}
        logged = last_line(stem + ".log")
        if status != 0:
            why = logged or (lines[-1] if lines else "")
            return {**result, "status": "failed", "error": f"{cmd[0]} exited with status {status}: {why}"}
        try:
            objective = hp_space.read_objective(values["out_file"])
        except UserError as err:
            why = logged or "no job log: cancelled before it started?"
            return {**result, "status": "failed", "error": f"job {job_id}: {err} ({why})"}
        os.remove(values["out_file"])
        return {**result, "status": "ok", "objective": objective}

    def cancel(self, job_ids=None):
        """Cancel jobs (default: those in flight); errors for jobs already gone are ignored."""
        if job_ids is None:
            with self.lock:
                job_ids = list(self.jobs.values())
        if job_ids:
            cancel = SCHEDULERS[self.scheduler]["cancel"]
            subprocess.run([cancel, *job_ids], capture_output=True, check=False, timeout=60)
            print(f"cancelled job(s) {' '.join(job_ids)}", flush=True)


def last_line(path):
    """The last non-empty line of a job log ('' when there is none)."""
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def stale_jobs(events):
    """Job ids of trials that were in flight when a previous run of the search stopped."""
    ended = {e["trial"] for e in events if e["event"] == "end"}
    return [e["job_id"] for e in events if e["event"] == "job" and e["trial"] not in ended]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, own = build_parser()
    args = parser.parse_args(argv)
    train_argv = hp_space.training_argv(argv, own)
    check_carried(train_argv)
    base, search_models = hp_space.resolve_base(train_argv)
    sub_file = os.path.abspath(args.sub_file or os.path.join(REPO, SCHEDULERS[args.scheduler]["sub_file"]))
    if not os.path.isfile(sub_file):
        raise UserError(f"--sub-file {sub_file} does not exist")
    if not os.access(sub_file, os.X_OK):
        raise UserError(f"--sub-file {sub_file} is not executable (chmod +x it)")
    submit = "sbatch" if args.scheduler == "slurm" else "qsub"
    if shutil.which(submit) is None:
        raise UserError(f"{submit} is not on the PATH: run this on a {args.scheduler} submit host")
    spec = hp_space.space_spec(base, search_models, args.rproj, only=hp_space.SUBMIT_FIELDS)
    header = {
        "script": "hp_search_slurm",
        "train_argv": train_argv,
        "space": spec,
        "optimizer": args.optimizer,
        "seed": base.seed,
        "workers": args.hp_workers,
        "scheduler": args.scheduler,
        "budget": args.budget,
    }
    temp_folder = os.path.abspath(args.temp_folder)
    os.makedirs(temp_folder, exist_ok=True)
    log = hp_space.TrialLog(base.checkpoint_path)
    runner = ClusterTrials(args.scheduler, sub_file, temp_folder, fixed_values(base), base, log)
    runner.cancel(stale_jobs(log.open(header)))
    optimizer = hp_space.make_optimizer(args.optimizer, spec, args.budget, args.hp_workers, base.seed)
    best = hp_space.run_search(log, header, optimizer, args.budget, args.hp_workers, runner, runner.cancel)
    return hp_space.finish(best, log, args.budget)


if __name__ == "__main__":
    cli(main)
