"""train.py and eval.py on images: the seed's command lines verbatim, the digits demo, TensorBoard logs."""

import json
import os

import numpy as np
import pytest
import torch
from tiny_data import make_image_tree

import eval as eval_script
import train
from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {
        split: make_image_tree(str(root / split), per_class=12, size=32, seed=k)
        for k, split in enumerate(("train", "valid", "test"))
    }


def test_seed_image_command_lines_run_verbatim(image_data, tmp_path, capsys):
    cp = str(tmp_path / "cp")
    argv = (
        f"--checkpoint-path {cp} --save-every 4 --data-path {image_data['train']} "
        f"--valid-data-path {image_data['valid']}/ --n-workers 8 --seed 1 --model resnet --batch-size 128 "
        "--valid-batch-size 128 --lr 1e-2 --momentum 0.9 --l2 1e-4 --epochs 1 --hidden-size 350 --n-hidden 3 "
        "--dropout-prob 0.01 --softmax am_softmax --smoothing 0.05"
    ).split()
    assert train.main(argv) == 0
    files = sorted(os.listdir(cp))
    assert files == ["args.json", "checkpoint_1ep.pt"]
    state = load_checkpoint(os.path.join(cp, "checkpoint_1ep.pt"))
    config = state["model_config"]
    assert config["model"] == "resnet" and config["softmax"] == "am_softmax" and config["n_classes"] == 4
    assert config["hidden_size"] == 350 and config["n_hidden"] == 3
    assert state["epoch"] == 1 and len(state["history"]["e2e_eer"]) == 1
    assert json.load(open(os.path.join(cp, "args.json")))["lr"] == 1e-2

    out = str(tmp_path / "scores.out")
    argv = f"--data-path {image_data['test']}/ --model resnet --cp-path {cp}/checkpoint_1ep.pt --out-path {out}"
    assert eval_script.main(argv.split()) == 0
    lines = [line for line in open(out).read().splitlines() if not line.startswith("#")]  # after the header
    n = 48
    assert len(lines) == n * (n - 1) // 2
    first = lines[0].split()
    assert first[:2] == ["0", "1"] and first[-1] in ("target", "nontarget")
    e2e, cos, fus = (float(v) for v in first[2:5])
    assert 0 <= e2e <= 1 and -1 <= cos <= 1 and abs(fus - 0.5 * (e2e + 0.5 * (cos + 1))) < 2e-6
    n_target = sum(line.endswith(" target") for line in lines)
    assert n_target == 4 * 12 * 11 // 2
    metrics = json.load(open(out + ".json"))["metrics"]
    # the seed's scorers, the logit, and the calibration the checkpoint carries (fitted on its validation pairs)
    assert set(metrics) == {"e2e", "cos", "fus", "e2e_logit", "cal_e2e_logit", "cal_cos", "cal_e2e_logit+cos"}
    assert set(metrics["e2e"]) == {"eer", "mindcf_0.01", "mindcf_0.05", "auc"}
    printed = capsys.readouterr().out
    assert "mindcf_0.01" in printed and "fus" in printed


def test_digits_demo_trains_then_prints_the_table(tmp_path, capsys):
    cp = str(tmp_path / "digits")
    assert train.main(["--epochs", "2", "--checkpoint-path", cp]) == 0
    printed = capsys.readouterr().out
    assert "364 test items, 66066 trials" in printed
    rows = {
        line.split()[0]: line.split()[1:]
        for line in printed.splitlines()
        if line.split()[:1] in (["e2e"], ["cos"], ["fus"])
    }
    assert set(rows) == {"e2e", "cos", "fus"}
    summary = json.load(open(os.path.join(cp, "test_scores.txt.json")))
    assert summary["trials"] == 66066
    for scorer, values in rows.items():
        assert abs(float(values[0]) - summary["metrics"][scorer]["eer"]) < 1e-4
    # Two epochs on the digits already beat chance (0.5).
    assert summary["metrics"]["cos"]["eer"] < 0.45
    kept = sorted(f for f in os.listdir(cp) if f.endswith(".pt"))
    assert 1 <= len(kept) <= 2


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = str(tmp_path / "logs")
    train.main(
        ["--epochs", "1", "--no-cp", "--logdir", logdir, "--checkpoint-path", str(tmp_path / "cp"), "--verbose", "0"]
    )
    acc = EventAccumulator(logdir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "Train/Total loss",
        "Train/Cross entropy",
        "Train/Binary loss",
        "Info/LR",
        "Valid/E2E EER",
        "Valid/Cosine EER",
        "Valid/Fus EER",
    ):
        assert tag in tags, tag
    losses = [e.value for e in acc.Scalars("Train/Total loss")]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert not os.path.exists(str(tmp_path / "cp" / "checkpoint_1ep.pt"))


def test_noam_schedule_matches_the_seed_formula():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, training.noam_factor(2000))
    seen = {}
    for step in range(1, 8001):
        seen[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert abs(seen[1] - 1.5 * 2000**-1.5) < 1e-12
    assert abs(seen[2000] - 1.5 / 2000**0.5) < 1e-9
    assert abs(seen[8000] - 1.5 / 8000**0.5) < 1e-9


def test_same_seed_same_weights_with_two_threads(tmp_path):
    torch.set_num_threads(2)
    weights = []
    for run in range(2):
        argv = ["--epochs", "1", "--no-cp", "--verbose", "0", "--checkpoint-path", str(tmp_path / str(run))]
        args = training.build_parser().parse_args(argv)
        model = training.fit(training.build(args, argv)).model
        weights.append(model.state_dict())
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
