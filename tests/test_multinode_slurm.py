"""run_train_slurm.sh through the real Slurm daemon: two tasks on this host act as two nodes, each a torchrun
agent with one gloo process, meeting at a c10d rendezvous on the allocation's first node.

Every process of both "nodes" takes part, the two processes train what one process computes on the same
global batches, and a job requeued mid-run (Slurm's time-limit warning, USR1 to the batch script) resumes
from its newest checkpoint and ends with the same weights as the uninterrupted job. The script's refusals
(agent count, rendezvous port in use, no flags) end the job at once with one line and exit status 2. The
cluster tests are marked `cluster`; the last one (which checkpoint `--checkpoint-epoch last` picks) needs none.
"""

import os
import re
import socket
import subprocess
import time

import pytest
import torch
from clusters import REPO, slurm_cluster

from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint
from e2e_verification.train_loop import TrainConfig, TrainLoop
from losses import PAIR_LOSSES, label_smoothing_ce
from utils import UserError

EPOCHS = 3
# Small and fast. No randomness inside a step (--augment none, --dropout-prob 0, --smoothing 0: the pair targets'
# noise), because each process draws from its own RNG stream, which the one-process reference would have to copy;
# the plain softmax head at --lr 0.01, because with AM-softmax (scale 30) this tiny net is chaotic: rounding
# differences (another thread count) grow 2x a step, to whole units by the third epoch.
FLAGS = ["--model", "resnet", "--width", "4", "--epochs", str(EPOCHS), "--device", "cpu", "--seed", "3",
         "--classes", "0-4", "--items-per-class", "60", "--batch-size", "10", "--valid-max-items", "50",
         "--hidden-size", "16", "--augment", "none", "--dropout-prob", "0", "--smoothing", "0",
         "--keep-checkpoints", "0", "--test-classes", "5-6", "--softmax", "softmax", "--lr", "0.01"]  # fmt: skip
# Two tasks on one node stand for two nodes (one torchrun agent each); 1 CPU each so jobs run side by side.
TWO_AGENTS = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"]
RANK_LINE = re.compile(r"^(\d+): process rank (\d+) of (\d+): node rank (\d+), local rank (\d+),", re.M)


def free_port():
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@pytest.fixture
def jobs():
    """Job ids a test submits; those still queued or running at its end are cancelled."""
    ids = []
    yield ids
    if ids:
        subprocess.run(["scancel", *map(str, ids)], capture_output=True)


def submit(folder, *train_flags, env=None, wait=False):
    """sbatch run_train_slurm.sh from the repository root, its output in `folder`; -> (job id, sbatch's exit)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "E2E_RDZV_PORT": str(free_port()),
        **(env or {}),
    }
    cmd = ["sbatch", "--parsable", f"--output={folder}/slurm-%j.out", *TWO_AGENTS]
    cmd += ["--wait"] if wait else []
    proc = subprocess.run([*cmd, str(REPO / "run_train_slurm.sh"), *train_flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert re.fullmatch(r"\d+\n", proc.stdout), proc.stdout + proc.stderr
    return int(proc.stdout), proc.returncode


def log_of(folder, job):
    return (folder / f"slurm-{job}.out").read_text()


def wait_gone(job, timeout=240):
    """Wait until Slurm no longer lists the job as pending, running or completing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() in ("", "COMPLETED", "FAILED", "CANCELLED"):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state.strip()} after {timeout} s")


def sacct(job):
    """Slurm's records of a job from the job completion log (a requeued job has two: PENDING, then its end)."""
    fields = "JobID,JobName,State,ExitCode,NNodes,NCPUS,NodeList"
    for _ in range(50):
        out = subprocess.run(["sacct", "-c", "-n", "-P", "-j", str(job), "-o", fields], capture_output=True, text=True)
        rows = [dict(zip(fields.split(","), line.split("|"))) for line in out.stdout.splitlines()]
        if any(row["State"] not in ("PENDING", "REQUEUED", "RUNNING") for row in rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"no final record of job {job} in sacct -c")


def signal_when(path, job, timeout=240):
    """Send USR1 to the job's batch script (as Slurm does before a time limit) once `path` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)


def one_process_reference(cp):
    """What one process (no torchrun, no process group) trains on the same global batches as the 2-process job.

    Under DistributedDataParallel each process normalises its own half of a global batch (batch norm) and
    forms pairs within it (the pair loss), and the gradients are averaged; so one process on the whole
    global batch would compute another loss. Instead this process takes each step on both halves, rank 1's
    then rank 0's (whose batch-norm running statistics DDP keeps: it broadcasts rank 0's buffers), and
    steps on the mean of the two gradients, on one thread as the job's processes (OMP_NUM_THREADS=1).
    Returns the final model state.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_halves(cp)
    finally:
        torch.set_num_threads(threads)


def train_halves(cp):
    """The steps of one_process_reference; -> the model's state_dict."""
    parsed = training.build_parser().parse_args(FLAGS + ["--checkpoint-path", str(cp)])
    run = training.build(parsed, FLAGS, torch.device("cpu"), announce=False)
    args, trainer, model = run.args, run.trainer, run.model
    halves = [training.make_loaders(args, run.task, run.datasets[0], None, trainer.device, r, 2)[0] for r in (1, 0)]
    model.train()
    for epoch in range(EPOCHS):
        for loader in halves:
            loader.batch_sampler.set_epoch(epoch)
        for (x1, y1), (x0, y0) in zip(*halves):
            trainer.optimizer.zero_grad(set_to_none=True)
            buffers = {name: b.clone() for name, b in model.named_buffers()}
            (step_loss(model, x1, y1) / 2).backward()
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
            (step_loss(model, x0, y0) / 2).backward()
            trainer.optimizer.step()
    return model.state_dict()


def step_loss(model, x, y):
    """train_loop's loss with these flags: cross-entropy plus the pair loss (no smoothing)."""
    logits, pair_logits, same = model(x, y)
    return label_smoothing_ce(logits, y, 0.0) + PAIR_LOSSES["bce"](pair_logits, same, 0.0)


@pytest.mark.cluster
def test_two_nodes_train_as_one_and_resume_after_requeue(tmp_path, jobs):
    cluster = slurm_cluster()
    full, requeued = tmp_path / "full", tmp_path / "requeued"
    first, _ = submit(tmp_path, *FLAGS, "--checkpoint-path", str(full))
    second, _ = submit(tmp_path, *FLAGS, "--checkpoint-path", str(requeued))
    jobs += [first, second]
    signal_when(requeued / "checkpoint_1ep.pt", second)
    reference = one_process_reference(tmp_path / "unused")
    wait_gone(first)
    wait_gone(second)

    log = log_of(tmp_path, first)
    ranks = sorted(
        (int(task), int(rank), int(world), int(node)) for task, rank, world, node, _ in RANK_LINE.findall(log)
    )
    assert len(ranks) == 2 and {r[1] for r in ranks} == {0, 1} and {r[3] for r in ranks} == {0, 1}, log[-3000:]
    assert {r[0] for r in ranks} == {0, 1} and {r[2] for r in ranks} == {2}  # Slurm tasks 0 and 1, world size 2
    assert log.count("epoch    3  loss") == 1
    (record,) = sacct(first)
    assert (record["State"], record["ExitCode"], record["NodeList"]) == ("COMPLETED", "0:0", cluster.node), record

    want = load_checkpoint(str(full / f"checkpoint_{EPOCHS}ep.pt"))
    for name, value in reference.items():  # gradients averaged by gloo vs. in one graph: float rounding only
        torch.testing.assert_close(want["model_state"][name], value, rtol=1e-4, atol=1e-5, msg=name)

    log = log_of(tmp_path, second)
    assert "(restart 0)" in log and "(restart 1)" in log and "requeueing job" in log, log[-3000:]
    resumed = re.search(r"resuming from \S+checkpoint_(\d+)ep\.pt \(epoch (\d+)\)", log)
    assert resumed and 1 <= int(resumed.group(1)) < EPOCHS, log[-3000:]
    assert [row["State"] for row in sacct(second)][-1] == "COMPLETED"
    assert not [name for name in os.listdir(requeued) if name.startswith(".")]  # no temporaries left behind
    got = load_checkpoint(str(requeued / f"checkpoint_{EPOCHS}ep.pt"))
    assert got["history"] == want["history"]
    for name, value in want["model_state"].items():
        assert torch.equal(got["model_state"][name], value), name


@pytest.mark.cluster
def test_refusals_end_the_job_with_one_line(tmp_path):
    slurm_cluster()
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {
            "E2E_NNODES=3 but the allocation runs 2 tasks": ([*FLAGS, "--checkpoint-path", "cp"], {"E2E_NNODES": "3"}),
            f"rendezvous port {port} on ": ([*FLAGS, "--checkpoint-path", "cp"], {"E2E_RDZV_PORT": port}),
            "no train.py flags given": ([], {}),
            "give --checkpoint-path": (FLAGS, {}),
        }
        for message, (flags, env) in cases.items():
            job, status = submit(tmp_path, *flags, env=env, wait=True)
            assert status == 2
            lines = log_of(tmp_path, job).splitlines()
            assert len(lines) == 1 and lines[0].startswith("run_train_slurm.sh: error: ") and message in lines[0]
    assert not (REPO / "cp").exists()


def test_last_checkpoint_is_the_highest_epoch(tmp_path):
    """--checkpoint-epoch last: the highest epoch number (10 after 9, not by name), else the --cp-name file."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def newest(**cfg):
        loop = TrainLoop(model, opt, None, "plateau", None, None, torch.device("cpu"), TrainConfig(epochs=1, **cfg))
        return loop.newest_checkpoint()

    assert newest(checkpoint_path=str(tmp_path / "absent")) is None
    assert newest(checkpoint_path=str(tmp_path)) is None
    for name in ("checkpoint_9ep.pt", "checkpoint_10ep.pt", "checkpoint_11ep.pt.tmp", "best.pt", "args.json"):
        (tmp_path / name).write_bytes(b"")
    assert newest(checkpoint_path=str(tmp_path)) == str(tmp_path / "checkpoint_10ep.pt")
    assert newest(checkpoint_path=str(tmp_path), cp_name="trial.pt") is None
    assert newest(checkpoint_path=str(tmp_path), cp_name="best.pt") == str(tmp_path / "best.pt")
    with pytest.raises(UserError, match="expected an epoch number or last, got latest"):
        training.build_parser().parse_args(["--checkpoint-epoch", "latest"])
