"""Crash safety of training: SIGKILL inside an epoch, resume from the last checkpoint, same weights; NaN stops.

A killed run is resumed from its newest checkpoint and must end with exactly the tensors of an
uninterrupted run (CPU, fixed seed): the batch order and every RNG are functions of (seed, epoch),
and the checkpoint holds model, optimiser (momentum) and scheduler states.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_data import make_image_tree, read_terminal, start_on_terminal

from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint, save_checkpoint
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAR = re.compile(rb"epoch 2/2:[^|\r\n]*\|[^|\r\n]*\| *(\d+)/(\d+)")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """80 PNGs of 4 classes: batches of 10 give 8 steps an epoch."""
    return make_image_tree(str(tmp_path_factory.mktemp("resume") / "train"), n_classes=4, per_class=20)


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    """40 PNGs of 4 classes: 4 steps an epoch, for the in-process runs."""
    return make_image_tree(str(tmp_path_factory.mktemp("resume_small") / "train"), n_classes=4, per_class=10)


def train_argv(data, cp, *extra):
    return ["--data-path", data, "--model", "resnet", "--epochs", "2", "--batch-size", "10", "--lr", "0.05",
            "--save-every", "1", "--device", "cpu", "--seed", "3", "--checkpoint-path", cp, *extra]  # fmt: skip


def run_train(argv):
    """train.py in a fresh interpreter; returns its stdout (fails the test on a non-zero exit)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def kill_inside_epoch_2(argv, timeout=300):
    """Start train.py with its stderr on a pseudo-terminal (so tqdm draws its bar) and SIGKILL it as soon as
    the epoch-2 bar shows a finished step that is not the last one. Returns the bar's (step, steps)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    proc, master = start_on_terminal(cmd, stdout=subprocess.DEVNULL)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = read_terminal(master)
            if chunk == b"":
                break
            seen = (seen + (chunk or b""))[-4096:]
            steps = [(int(a), int(b)) for a, b in BAR.findall(seen)]
            if steps and 1 <= steps[-1][0] <= steps[-1][1] - 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return steps[-1]
        raise AssertionError(f"never saw train.py inside epoch 2 (exit {proc.poll()}): {seen[-300:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def assert_same(a, b, where="checkpoint"):
    """Recursive equality of checkpoint contents: tensors bit for bit (torch.equal), floats with NaN == NaN."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: nan != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def compare_final(cp_a, cp_b, epoch=2):
    a = load_checkpoint(os.path.join(cp_a, f"checkpoint_{epoch}ep.pt"))
    b = load_checkpoint(os.path.join(cp_b, f"checkpoint_{epoch}ep.pt"))
    assert len(a["model_state"]) > 100 and a["optimizer_state"]["state"]
    for key in ("model_state", "optimizer_state", "scheduler_state", "epoch", "total_iters", "history", "best"):
        assert_same(a[key], b[key], key)


def test_sigkill_inside_an_epoch_then_resume_equals_uninterrupted(images, tmp_path):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    printed = run_train(train_argv(images, straight)).splitlines()
    config = next(line for line in printed if line.startswith("{"))  # the configuration, printed first
    assert '"lr": 0.05' in config and '"seed": 3' in config

    step, steps = kill_inside_epoch_2(train_argv(images, crashed))
    assert steps == 8 and 1 <= step <= 6
    left = sorted(os.listdir(crashed))
    assert left == ["args.json", "checkpoint_1ep.pt"], left  # no epoch-2 file, no temporary file
    run_train(train_argv(images, crashed, "--checkpoint-epoch", "1"))
    compare_final(straight, crashed)


def test_two_epochs_equal_one_epoch_then_resume_in_process(few_images, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    argv = train_argv(few_images, straight, "--verbose", "0")
    training.fit(training.build(training.build_parser().parse_args(argv), argv))
    argv = train_argv(few_images, resumed, "--verbose", "0", "--epochs", "1")
    training.fit(training.build(training.build_parser().parse_args(argv), argv))
    argv = train_argv(few_images, resumed, "--verbose", "0", "--checkpoint-epoch", "1")
    training.fit(training.build(training.build_parser().parse_args(argv), argv))
    compare_final(straight, resumed)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(few_images, tmp_path):
    cp = str(tmp_path / "cp")
    argv = train_argv(few_images, cp, "--verbose", "0", "--epochs", "1")
    training.fit(training.build(training.build_parser().parse_args(argv), argv))
    good = os.path.join(cp, "checkpoint_1ep.pt")
    state = load_checkpoint(good)
    for group in state["optimizer_state"]["param_groups"]:
        group["lr"] = 1e30  # the next step throws every weight to ~1e30: the loss overflows to inf / nan
    save_checkpoint(good, state)
    before = open(good, "rb").read()

    argv = train_argv(few_images, cp, "--verbose", "0", "--checkpoint-epoch", "1")
    with pytest.raises(UserError) as stop:
        training.fit(training.build(training.build_parser().parse_args(argv), argv))
    message = str(stop.value)
    found = re.search(r"loss became (nan|inf|-inf) at epoch 2, step (\d+)", message)
    assert found, message
    assert 5 < int(found.group(2)) <= 8  # a step of epoch 2 (steps 5..8), after the first huge update
    assert good in message and "\n" not in message
    assert open(good, "rb").read() == before
    assert_same(load_checkpoint(good), state)
    assert sorted(os.listdir(cp)) == ["args.json", "checkpoint_1ep.pt"]
