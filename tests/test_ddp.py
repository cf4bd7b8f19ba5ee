"""DistributedDataParallel on the CPU: `torchrun --nproc_per_node=2` runs train.py over gloo.

Rank 0 alone writes checkpoints, args.json, TensorBoard events and the epoch lines; a run resumed
from its first checkpoint ends with the same weights as the uninterrupted one.
"""

import os
import subprocess
import sys

import torch

from e2e_verification.checkpoints import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "densenet", "--epochs", "2", "--keep-checkpoints", "0", "--device", "cpu", "--verbose", "1"]


def torchrun(*args):
    """Run train.py under torch.distributed.run with 2 CPU processes; -> stdout (fails on a non-zero exit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_two_process_training_writes_once_and_resumes_exactly(tmp_path):
    full, resumed, logs = tmp_path / "full", tmp_path / "resumed", tmp_path / "tb"
    stdout = torchrun(*FLAGS, "--checkpoint-path", str(full), "--logdir", str(logs))
    assert stdout.count("epoch    1  loss") == 1 and stdout.count("epoch    2  loss") == 1  # rank 0 prints
    names = sorted(os.listdir(full))
    assert [n for n in names if n.endswith(".pt")] == ["checkpoint_1ep.pt", "checkpoint_2ep.pt"]
    assert "args.json" in names and not [n for n in names if n.startswith(".")]  # no temporaries left
    assert len([n for n in os.listdir(logs) if n.startswith("events.")]) == 1
    first = load_checkpoint(str(full / "checkpoint_1ep.pt"))
    assert first["epoch"] == 1 and len(first["history"]["train_loss"]) == 1

    resumed.mkdir()
    (resumed / "checkpoint_1ep.pt").write_bytes((full / "checkpoint_1ep.pt").read_bytes())
    stdout = torchrun(*FLAGS, "--checkpoint-path", str(resumed), "--checkpoint-epoch", "1")
    assert "epoch    1  loss" not in stdout and stdout.count("epoch    2  loss") == 1
    want = load_checkpoint(str(full / "checkpoint_2ep.pt"))
    got = load_checkpoint(str(resumed / "checkpoint_2ep.pt"))
    assert got["epoch"] == 2 and got["history"] == want["history"]
    for key, value in want["model_state"].items():
        assert torch.equal(got["model_state"][key], value), key
