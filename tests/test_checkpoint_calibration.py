"""The calibration a checkpoint carries: train.py fits it on the validation pairs of each validated epoch (the
e2e logit and cosine, alone and fused), eval.py adds its cal_* columns and verify.py decides with it when the
user gives no calibration file, threshold or raw scorer; a resumed run keeps it."""

import json
import os

import numpy as np
import pytest
from tiny_data import make_image_tree

import eval as eval_cmd
import train
import verify
from e2e_verification.calibration import apply_calibration, read_scores
from e2e_verification.checkpoints import load_checkpoint, load_model

FLAGS = ["--model", "resnet", "--width", "4", "--epochs", "2", "--batch-size", "20", "--device", "cpu"]
FLAGS += ["--verbose", "0", "--keep-checkpoints", "0", "--hidden-size", "16", "--n-hidden", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny image run: 4 training classes, validation on 3 other classes, a test set of 3 more."""
    root = tmp_path_factory.mktemp("calibrated")
    train_tree = make_image_tree(root / "train", n_classes=4, per_class=30, seed=0)
    valid_tree = make_image_tree(root / "valid", n_classes=3, per_class=12, seed=1)
    test_tree = make_image_tree(root / "test", n_classes=3, per_class=10, seed=2)
    cp = root / "cp"
    argv = ["--data-path", train_tree, "--valid-data-path", valid_tree, "--checkpoint-path", str(cp), *FLAGS]
    assert train.main(argv) == 0
    return {"root": root, "cp": str(cp / "checkpoint_2ep.pt"), "test": test_tree, "argv": argv}


def test_each_validated_checkpoint_carries_a_calibration_fitted_on_its_validation_pairs(run):
    state = load_checkpoint(run["cp"])
    params = state["calibration"]
    assert sorted(params["calibrations"]) == ["cos", "e2e_logit"]
    assert list(params["fusions"]) == ["e2e_logit+cos"] and params["p_target"] == 0.5
    n = 3 * 12
    assert params["fitted_on"]["trials"] == n * (n - 1) // 2 and params["fitted_on"]["targets"] == 3 * 12 * 11 // 2
    assert params["calibrations"]["cos"]["a"] > 0  # a same-class pair has the higher cosine on these classes
    first = load_checkpoint(os.path.join(os.path.dirname(run["cp"]), "checkpoint_1ep.pt"))["calibration"]
    assert first != params  # each epoch's own fit
    assert load_model(run["cp"]).calibration == params


def test_eval_adds_the_checkpoints_calibrated_columns(run, tmp_path):
    out = tmp_path / "scores.out"
    assert eval_cmd.main(["--data-path", run["test"], "--cp-path", run["cp"], "--out-path", str(out)]) == 0
    metrics = json.loads((tmp_path / "scores.out.json").read_text())["metrics"]
    for name in ("cal_e2e_logit", "cal_cos", "cal_e2e_logit+cos"):
        assert 0 <= metrics[name]["eer"] <= 1 and metrics[name]["cllr"] > 0, name
    columns = read_scores(str(out)).columns
    params = load_checkpoint(run["cp"])["calibration"]
    want = apply_calibration(params, {k: columns[k] for k in ("e2e_logit", "cos")})
    for name, values in want.items():
        np.testing.assert_allclose(columns[name], values, rtol=0, atol=1e-3)  # the file rounds its columns


def test_verify_decides_with_the_checkpoints_calibration_unless_told_otherwise(run, capsys):
    images = sorted(os.path.join(run["test"], "class0", f) for f in os.listdir(os.path.join(run["test"], "class0")))
    other = os.path.join(run["test"], "class1", "0.png")
    argv = ["--cp-path", run["cp"], "--enroll", images[0], "--test", images[1], other, "--device", "cpu", "--json"]
    assert verify.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["column"] == "cal_e2e_logit+cos" and "the checkpoint's calibration" in summary["decision"]
    assert summary["p_target"] == 0.01 and abs(summary["threshold"] - np.log(99)) < 1e-9
    assert set(summary["results"][0]["llr"]) == {"cal_e2e_logit", "cal_cos", "cal_e2e_logit+cos"}
    assert verify.main([*argv, "--threshold", "0.5"]) == 0  # a raw threshold: the raw e2e score decides
    summary = json.loads(capsys.readouterr().out)
    assert summary["column"] == "e2e" and summary["results"][0]["llr"] == {}
    assert verify.main([*argv, "--scorer", "cal_cos", "--p-target", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["column"] == "cal_cos" and summary["threshold"] == 0.0


def test_a_resumed_run_keeps_the_calibration_it_resumed_from(run, tmp_path):
    folder = tmp_path / "resumed"
    folder.mkdir()
    source = os.path.join(os.path.dirname(run["cp"]), "checkpoint_1ep.pt")
    (folder / "checkpoint_1ep.pt").write_bytes(open(source, "rb").read())
    argv = [a if a != str(os.path.dirname(run["cp"])) else str(folder) for a in run["argv"]]
    assert train.main([*argv, "--checkpoint-epoch", "1"]) == 0
    resumed = load_checkpoint(str(folder / "checkpoint_2ep.pt"))["calibration"]
    assert resumed == load_checkpoint(run["cp"])["calibration"]


def test_a_run_without_validation_carries_none(tmp_path):
    tree = make_image_tree(tmp_path / "train", n_classes=3, per_class=20, seed=3)
    cp = tmp_path / "cp"
    argv = ["--data-path", tree, "--checkpoint-path", str(cp), *FLAGS[:4], "--epochs", "1", *FLAGS[6:]]
    assert train.main(argv) == 0
    assert load_checkpoint(str(cp / "checkpoint_1ep.pt"))["calibration"] is None
