"""train.py's model selection on held-out classes: --select-by (which validation EER picks the best checkpoint) and
--holdout-classes (validate on classes drawn out of the training data), on real image folders and speaker HDF5s."""

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch
from tiny_data import make_image_tree, write_speaker_hdf5

import data_load
import train
from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint
from e2e_verification.train_loop import best_epoch
from utils import cli

NCOEF = 12
SIZE, N_IMAGE_CLASSES = 8, 6
SPEAKERS = [f"spk{s}" for s in range(6)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six image classes (a white stripe of its own per class) and six speakers (coefficient 0 of every frame is the
    speaker's index, the others noise), so a batch tells which classes it holds."""
    root = tmp_path_factory.mktemp("holdout")
    images = make_image_tree(str(root / "images"), n_classes=N_IMAGE_CLASSES, per_class=10, size=SIZE)
    valid = make_image_tree(str(root / "valid"), n_classes=N_IMAGE_CLASSES, per_class=4, size=SIZE, seed=1)
    h5 = write_speaker_hdf5(str(root / "train.h5"), {spk: 6 for spk in SPEAKERS}, ncoef=NCOEF, frames=30)
    with h5py.File(h5, "r+") as f:
        for s, spk in enumerate(SPEAKERS):
            for utt in f[spk].values():
                utt[0, :] = float(s)
    return {"images": images, "valid": valid, "h5": h5}


def image_argv(data, out, *extra):
    return ["--data-path", data, "--model", "resnet", "--width", "8", "--hidden-size", "32", "--epochs", "1",
            "--batch-size", "10", "--augment", "none", "--device", "cpu", "--checkpoint-path", out, "--verbose", "0",
            *extra]  # fmt: skip


def speech_argv(h5, out, *extra):
    return ["--train-hdf-file", h5, "--model", "TDNN", "--ncoef", str(NCOEF), "--n-frames", "20", "--latent-size",
            "16", "--hidden-size", "32", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--lr", "0.5",
            "--warmup", "2", "--device", "cpu", "--checkpoint-path", out, "--verbose", "0", *extra]  # fmt: skip


def build(argv):
    return training.build(training.build_parser().parse_args(argv), argv)


def refused(argv, capsys, *words):
    """train.py through utils.cli: exit 2 with one stderr line holding `words`."""
    with pytest.raises(SystemExit) as done:
        cli(train.main, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert done.value.code == 2 and len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines[0]


def stripe_class(image):
    """The class of a make_image_tree image (C, H, W) read without augmentation: which columns are all white."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data_load.IMAGENET_STATS)
    white = ((image * std + mean) > 0.999).all(dim=0).all(dim=0)
    found = [
        c
        for c in range(N_IMAGE_CLASSES)
        if white[c * SIZE // N_IMAGE_CLASSES : (c + 1) * SIZE // N_IMAGE_CLASSES].all()
    ]
    assert len(found) == 1, white
    return found[0]


def classes_in_batches(loader, epochs, read_class):
    """The original classes of every item the training loader yields over `epochs` epochs."""
    seen = set()
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for x, _ in loader:
            seen.update(read_class(item) for item in x)
    return seen


# ----------------------------------------------------------------------------- --select-by


def test_best_epoch_is_the_latest_lowest_finite_eer():
    history = {"e2e_eer": [0.4, 0.2, math.nan, 0.2, 0.3], "cos_eer": [math.nan, math.nan], "fus_eer": []}
    assert best_epoch(history, "e2e") == 4
    assert best_epoch(history, "cos") is None and best_epoch(history, "fus") is None
    assert best_epoch({}, "e2e") is None
    assert best_epoch({"cos_eer": [0.3, 0.1, 0.5]}, "cos") == 2


def test_select_by_keeps_and_prints_the_file_of_the_chosen_scorers_best_epoch(data, tmp_path, capsys):
    out = str(tmp_path / "cp")
    argv = image_argv(data["images"], out, "--valid-data-path", data["valid"], "--epochs", "3", "--seed", "2",
                      "--keep-checkpoints", "1", "--select-by", "fus", "--verbose", "1")  # fmt: skip
    assert train.main(argv) == 0
    state = load_checkpoint(os.path.join(out, "checkpoint_3ep.pt"))
    history = state["history"]
    epoch = best_epoch(history, "fus")
    assert epoch < 3 and epoch != best_epoch(history, "e2e"), history  # what this case is about (fixed seed)
    assert state["select_by"] == "fus" and state["best_checkpoint"] == f"checkpoint_{epoch}ep.pt"
    kept = {f"checkpoint_{e}ep.pt" for e in (epoch, 3)}
    assert {f for f in os.listdir(out) if f.endswith(".pt")} == kept  # pruning spares the fus best, not the e2e one
    assert state["best"]["fus"] == min(history["fus_eer"])
    expected = f"best checkpoint by validation fus EER {history['fus_eer'][epoch - 1]:.4f}: "
    assert expected + os.path.join(out, f"checkpoint_{epoch}ep.pt") in capsys.readouterr().out.splitlines()
    assert json.load(open(os.path.join(out, "args.json")))["select_by"] == "fus"


def new_lows(eers):
    """The 1-based epochs whose EER is below every earlier one."""
    return [i + 1 for i, eer in enumerate(eers) if eer < min(eers[:i], default=math.inf)]


@pytest.mark.parametrize("scorer", ["fus", None])
def test_a_cp_name_file_holds_the_chosen_scorers_best_epoch_or_the_research_codes_choice(data, tmp_path, scorer):
    """--select-by: the fixed file holds the chosen scorer's best epoch. Without it, as the research code: the last
    epoch whose e2e or cos EER was a new low, which the checkpoint calls best only when it is the e2e best."""
    out = str(tmp_path / "cp")
    argv = image_argv(data["images"], out, "--valid-data-path", data["valid"], "--epochs", "3", "--cp-name",
                      "trial.pt", "--seed", "2", *(["--select-by", scorer] if scorer else []))  # fmt: skip
    run = training.fit(build(argv))
    assert sorted(os.listdir(out)) == ["args.json", "trial.pt"]
    state, history, path = (
        load_checkpoint(os.path.join(out, "trial.pt")),
        run.trainer.history,
        os.path.join(out, "trial.pt"),
    )
    summary = run.trainer.best_summary()
    if scorer:
        assert state["epoch"] == best_epoch(history, scorer) and run.trainer.best_checkpoint == path
        assert summary.endswith(f": {path}")
        return
    assert state["epoch"] == max(new_lows(history["e2e_eer"]) + new_lows(history["cos_eer"]))
    holds_best = state["epoch"] == best_epoch(history, "e2e")
    assert run.trainer.best_checkpoint == (path if holds_best else None)
    assert state["best_checkpoint"] == ("trial.pt" if holds_best else None) and state["select_by"] is None
    assert summary.endswith(f": {path}" if holds_best else "--select-by keeps it)")


def test_a_resumed_run_keeps_its_select_by_and_refuses_another(data, tmp_path, capsys):
    out = str(tmp_path / "cp")
    common = image_argv(data["images"], out, "--valid-data-path", data["valid"])
    assert train.main([*common, "--select-by", "cos"]) == 0
    assert train.main([*common, "--epochs", "2", "--checkpoint-epoch", "1"]) == 0  # no --select-by: the stored one
    state = load_checkpoint(os.path.join(out, "checkpoint_2ep.pt"))
    assert state["select_by"] == "cos" and state["args"]["select_by"] == "cos"
    assert state["best_checkpoint"] == f"checkpoint_{best_epoch(state['history'], 'cos')}ep.pt"
    assert json.load(open(os.path.join(out, "args.json")))["select_by"] == "cos"
    again = [*common, "--epochs", "3", "--checkpoint-epoch", "2", "--select-by", "e2e"]
    refused(again, capsys, "checkpoint_2ep.pt", "--select-by cos", "not --select-by e2e")


def test_a_run_without_select_by_resumes_with_the_default_named_and_refuses_another(data, tmp_path, capsys):
    out = str(tmp_path / "cp")
    common = image_argv(data["images"], out, "--valid-data-path", data["valid"])
    assert train.main(common) == 0
    assert load_checkpoint(os.path.join(out, "checkpoint_1ep.pt"))["select_by"] is None
    resumed = [*common, "--epochs", "2", "--checkpoint-epoch", "1"]
    assert build([*resumed, "--select-by", "e2e"]).trainer.cfg.select_by == "e2e"
    refused([*resumed, "--select-by", "fus"], capsys, "the default --select-by e2e, not --select-by fus")


# ----------------------------------------------------------------------------- --holdout-classes


def test_image_holdout_validates_on_classes_never_in_a_training_batch(data, tmp_path, capsys):
    out = str(tmp_path / "cp")
    run = build(image_argv(data["images"], out, "--holdout-classes", "2", "--seed", "5", "--verbose", "1"))
    held = data_load.draw_holdout(np.arange(N_IMAGE_CLASSES), 2, 5)
    names = [f"class{c}" for c in held]
    assert run.args.holdout_class_names == names and run.trainer.cfg.record["holdout_class_names"] == names
    assert f"held out for validation (20 items): {', '.join(names)}" in capsys.readouterr().out
    assert run.model.config["n_classes"] == N_IMAGE_CLASSES - 2
    trained = classes_in_batches(run.trainer.train_loader, 2, stripe_class)
    assert trained == set(range(N_IMAGE_CLASSES)) - set(held)
    valid = run.datasets[1]
    assert sorted({stripe_class(valid[i][0]) for i in range(len(valid))}) == held
    assert torch.equal(valid[0][0], valid[0][0])  # fixed inputs: no random crop or flip
    assert sorted(set(np.asarray(run.trainer.train_loader.dataset.labels).tolist())) == [0, 1, 2, 3]
    training.fit(run)
    assert json.load(open(os.path.join(out, "args.json")))["holdout_class_names"] == names
    assert np.isfinite(run.trainer.history["e2e_eer"][0])


def test_image_holdout_after_classes_draws_among_those(data, tmp_path):
    run = build(image_argv(data["images"], str(tmp_path / "cp"), "--classes", "1-5", "--holdout-classes", "2"))
    held = [f"class{c + 1}" for c in data_load.draw_holdout(np.arange(5), 2, 1)]
    assert run.args.holdout_class_names == held and run.model.config["n_classes"] == 3
    trained = classes_in_batches(run.trainer.train_loader, 1, stripe_class)
    assert trained == {1, 2, 3, 4, 5} - {int(name[5:]) for name in held}


def speaker_of(matrix):
    """The speaker index a training crop (ncoef, frames) carries in coefficient 0."""
    values = set(matrix[0].tolist())
    assert len(values) == 1
    return SPEAKERS[int(values.pop())]


def test_speech_holdout_keeps_the_held_out_speakers_out_of_every_batch_and_resumes(data, tmp_path, capsys):
    out = str(tmp_path / "cp")
    common = speech_argv(data["h5"], out, "--holdout-classes", "2", "--seed", "3", "--workers", "2")
    run = build(common)
    held = [SPEAKERS[c] for c in data_load.draw_holdout(np.arange(len(SPEAKERS)), 2, 3)]
    assert run.args.holdout_class_names == held and run.model.config["n_classes"] == 4
    trained = classes_in_batches(run.trainer.train_loader, 2, speaker_of)  # read lazily by two worker processes
    assert trained == set(SPEAKERS) - set(held)
    valid = run.datasets[1]
    assert {speaker_of(valid[i][0]) for i in range(len(valid))} == set(held) and len(valid) == 12
    training.fit(run)
    assert train.main([*common, "--epochs", "2", "--checkpoint-epoch", "1"]) == 0
    state = load_checkpoint(os.path.join(out, "checkpoint_2ep.pt"))
    assert state["args"]["holdout_class_names"] == held and state["model_config"]["n_classes"] == 4
    other = next(s for s in range(4, 100) if data_load.draw_holdout(np.arange(len(SPEAKERS)), 2, s) != held)
    capsys.readouterr()
    argv = speech_argv(data["h5"], out, "--holdout-classes", "2", "--seed", str(other), "--epochs", "3")
    refused([*argv, "--checkpoint-epoch", "2"], capsys, "checkpoint_2ep.pt", "holding out", ", ".join(held))


def test_digits_demo_holds_out_digits_and_tests_on_them(tmp_path):
    run = build(["--holdout-classes", "3", "--epochs", "1", "--checkpoint-path", str(tmp_path / "digits")])
    held = data_load.draw_holdout(np.arange(10), 3, 1)
    assert run.args.holdout_class_names == [str(c) for c in held] and run.model.config["n_classes"] == 7
    valid = run.datasets[1]
    assert sorted(set(valid.original_labels.tolist())) == held
    assert set(run.datasets[0].original_labels.tolist()) == set(range(10)) - set(held)
    test = run.task.final_test(run.args)
    assert sorted(set(test.original_labels.tolist())) == held


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--holdout-classes", "1"], ["--holdout-classes", "must be >= 2", "validation needs two classes"]),
        (["--holdout-classes", "5"], ["--holdout-classes 5", "6 classes", "at most 4"]),
        (["--holdout-classes", "2", "--valid-data-path", "VALID"], ["--holdout-classes", "--valid-data-path"]),
        (["--holdout-classes", "2", "--valid-classes", "0-3"], ["--holdout-classes", "--valid-classes"]),
    ],
)
def test_image_holdout_refusals(data, tmp_path, capsys, extra, words):
    extra = [data["valid"] if e == "VALID" else e for e in extra]
    refused(image_argv(data["images"], str(tmp_path / "cp"), *extra), capsys, *words)
    assert not os.path.exists(tmp_path / "cp")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--holdout-classes", "5"], ["--holdout-classes 5", "6 classes", "at most 4"]),
        (["--holdout-classes", "2", "--valid-hdf-file", "H5"], ["--holdout-classes", "--valid-hdf-file"]),
    ],
)
def test_speech_holdout_refusals(data, tmp_path, capsys, extra, words):
    extra = [data["h5"] if e == "H5" else e for e in extra]
    refused(speech_argv(data["h5"], str(tmp_path / "cp"), *extra), capsys, *words)
