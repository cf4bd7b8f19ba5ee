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
from e2e_verification.calibration import MIN_CALIBRATION_CLASSES, apply_calibration, read_scores, transfer_caveat
from e2e_verification.checkpoints import load_checkpoint, load_model

FLAGS = ["--model", "resnet", "--width", "4", "--epochs", "2", "--batch-size", "20", "--device", "cpu"]
FLAGS += ["--verbose", "0", "--keep-checkpoints", "0", "--hidden-size", "16", "--n-hidden", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny image run: 4 training classes, validation on 3 other classes, a test set of 3 more."""
    root = tmp_path_factory.mktemp("calibrated")
    train_tree = make_image_tree(root / "train", n_classes=4, per_class=30, seed=0)
    valid_tree = make_image_tree(root / "valid", n_classes=3, per_class=12, seed=1, prefix="held")
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
    assert params["fitted_on"]["classes"] == 3 and params["fitted_on"]["held_out"] is True
    assert params["calibrations"]["cos"]["a"] > 0  # a same-class pair has the higher cosine on these classes
    first = load_checkpoint(os.path.join(os.path.dirname(run["cp"]), "checkpoint_1ep.pt"))["calibration"]
    assert first != params  # each epoch's own fit
    assert load_model(run["cp"]).calibration == params


def test_eval_adds_the_checkpoints_calibrated_columns(run, tmp_path, capsys):
    out = tmp_path / "scores.out"
    assert eval_cmd.main(["--data-path", run["test"], "--cp-path", run["cp"], "--out-path", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "checkpoint's calibration" in line]
    assert warnings == [
        "warning: the checkpoint's calibration (fitted on its validation pairs) may be far from calibrated on new "
        "classes: it was fitted on 3 held-out classes only, too few to hold on other classes; calibrate on "
        "development trials of new classes with calibrate.py"
    ]
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
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "checkpoint's calibration" not in captured.err  # not used, so no warning about it
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


def test_a_calibration_fitted_on_training_classes_is_flagged_when_used(tmp_path, capsys):
    """Validation images of the training classes (the same class names): the checkpoint records that its
    calibration saw only trained classes, and verify.py says so when it decides with it."""
    tree = make_image_tree(tmp_path / "train", n_classes=3, per_class=20, seed=3)
    valid = make_image_tree(tmp_path / "valid", n_classes=3, per_class=8, seed=4)
    cp = tmp_path / "cp"
    argv = ["--data-path", tree, "--valid-data-path", valid, "--checkpoint-path", str(cp), *FLAGS[:4]]
    assert train.main([*argv, "--epochs", "1", *FLAGS[6:]]) == 0
    path = str(cp / "checkpoint_1ep.pt")
    fitted = load_checkpoint(path)["calibration"]["fitted_on"]
    assert fitted["classes"] == 3 and fitted["held_out"] is False
    image = os.path.join(valid, "class0", "0.png")
    assert verify.main(["--cp-path", path, "--enroll", image, "--test", image, "--device", "cpu", "--json"]) == 0
    err = capsys.readouterr().err
    assert "the model trained on its validation classes (3), so its LLRs are over-confident on new ones" in err


def test_the_caveat_follows_what_the_calibration_was_fitted_on():
    def params(**fitted):
        return {"fitted_on": {"what": "validation pairs", "trials": 100, "targets": 10, **fitted}}

    assert transfer_caveat(params(classes=MIN_CALIBRATION_CLASSES, held_out=True)) is None
    assert "2 held-out classes only" in transfer_caveat(params(classes=2, held_out=True))
    assert "over-confident" in transfer_caveat(params(classes=500, held_out=False))
    assert transfer_caveat(params()) is None  # an older checkpoint records neither: nothing to say
    assert transfer_caveat(None) is None
