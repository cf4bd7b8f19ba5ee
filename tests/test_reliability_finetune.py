"""Fine-tuning (train.py --pretrained-path) meets a wrong checkpoint or folder early, with one line, writing nothing.

The checkpoint is read and checked before any data: its domain first, then the architecture flags (which come
from it unless typed); the checkpoint folder may not hold (or lie inside) an input of the run, yet a run still
resumes in its own folder.
"""

import os
import shutil

import h5py
import numpy as np
import pytest
from test_reliability_train import refused, snapshot, speech_argv, write_hdf5
from tiny_data import make_image_tree, write_checkpoint

import train
from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint

SPEECH_ARCH = {"ncoef": 30, "latent_size": 16}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A speech checkpoint (TDNN on 30 coefficients), image checkpoints (densenet; resnet of default width),
    speaker HDF5s of 30 and 23 coefficients, and an image tree (read-only for the cases)."""
    root = tmp_path_factory.mktemp("finetune")
    paths = {
        "cp_speech": write_checkpoint(str(root / "speech.pt"), "TDNN", 4, SPEECH_ARCH),
        "cp_image": write_checkpoint(str(root / "densenet.pt")),
        "cp_resnet": write_checkpoint(str(root / "resnet.pt"), "resnet"),
        "h5": write_hdf5(str(root / "train.h5")),
        "h5_valid": write_hdf5(str(root / "valid.h5"), seed=1),
        "images": make_image_tree(str(root / "images"), n_classes=4, per_class=10),
    }
    paths["h5_23"] = str(root / "train23.h5")
    with h5py.File(paths["h5_23"], "w") as h5:
        h5.attrs["ncoef"] = 23
        for s in range(4):
            for u in range(5):
                h5.create_dataset(f"s{s}/s{s}-{u}", data=np.random.default_rng(s).normal(size=(23, 40)).astype("f4"))
    return paths


def fine_tune_speech(d, out, *extra, data="h5"):
    """A speech fine-tuning command line without architecture flags (they come from the checkpoint)."""
    argv = speech_argv(d[data], out, "--pretrained-path", d["cp_speech"], *extra)
    for flag in ("--ncoef", "--latent-size", "--hidden-size"):
        i = argv.index(flag)
        del argv[i : i + 2]
    return argv


def build(argv):
    return training.build(training.build_parser().parse_args(argv), argv)


# ----------------------------------------------------------------------------- item 4: the checkpoint folder


def test_item4_checkpoint_folder_holding_the_pretrained_checkpoint_is_refused(d, tmp_path, capsys):
    out = str(tmp_path / "cp_ft")
    os.makedirs(out)
    source = shutil.copy(d["cp_speech"], os.path.join(out, "checkpoint_1ep.pt"))
    argv = [*fine_tune_speech(d, out), "--pretrained-path", source]
    refused(train.main, argv, out, capsys, f"--checkpoint-path {out} holds --pretrained-path {source}")


def test_item4_checkpoint_folder_inside_an_image_folder_is_refused(d, tmp_path, capsys):
    """A checkpoint folder (or --logdir) inside the image folder would be read as one more class next time."""
    data = shutil.copytree(d["images"], str(tmp_path / "i"))
    out = os.path.join(data, "cp")
    argv = ["--data-path", data, "--checkpoint-path", out, "--epochs", "1"]
    refused(train.main, argv, out, capsys, f"lies inside --data-path {data}")
    logs = os.path.join(data, "logs")
    argv = ["--data-path", data, "--checkpoint-path", str(tmp_path / "cp"), "--epochs", "1", "--logdir", logs]
    refused(train.main, argv, data, capsys, f"--logdir {logs} lies inside --data-path {data}")
    assert not (tmp_path / "cp").exists() and not os.path.exists(logs)


def test_item4_fine_tuning_resumes_in_its_own_folder(d, tmp_path):
    out = str(tmp_path / "cp")
    assert train.main(fine_tune_speech(d, out, "--valid-hdf-file", d["h5_valid"])) == 0
    argv = fine_tune_speech(d, out, "--valid-hdf-file", d["h5_valid"], "--epochs", "2", "--checkpoint-epoch", "1")
    assert train.main(argv) == 0
    assert load_checkpoint(os.path.join(out, "checkpoint_2ep.pt"))["epoch"] == 2


def test_item4_failed_resume_writes_no_log(d, tmp_path, capsys):
    out, logs = str(tmp_path / "cp"), str(tmp_path / "logs")
    assert train.main(speech_argv(d["h5"], out)) == 0
    argv = speech_argv(d["h5"], out, "--epochs", "2", "--checkpoint-epoch", "1", "--lr-schedule", "plateau")
    refused(train.main, [*argv, "--logdir", logs], out, capsys, "--lr-schedule noam, not plateau")
    assert not os.path.exists(logs)


# ----------------------------------------------------------------------------- items 20 and 24: the domain


def test_item20_speech_checkpoint_onto_the_digits_is_one_line(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    argv = ["--epochs", "1", "--pretrained-path", d["cp_speech"], "--checkpoint-path", out]
    line = refused(train.main, argv, out, capsys, f"--pretrained-path {d['cp_speech']} holds a speech model (TDNN)")
    assert "not an image model" in line and "digits" in line
    assert not os.path.exists(out)


def test_item24_image_checkpoint_onto_speech_names_the_domain_first(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    argv = speech_argv(d["h5"], out, "--pretrained-path", d["cp_image"])  # --ncoef 30 typed
    line = refused(train.main, argv, out, capsys, "holds an image model (densenet), not a speech model")
    assert "--ncoef" not in line


# ----------------------------------------------------------------------------- item 23: flags from the checkpoint


def test_item23_ncoef_and_latent_size_come_from_the_checkpoint(d, tmp_path):
    run = build(fine_tune_speech(d, str(tmp_path / "cp")))
    assert run.args.ncoef == 30 and run.args.latent_size == 16
    assert run.model.config["encoder_args"] == SPEECH_ARCH
    assert not (tmp_path / "cp").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--ncoef", "23"], ("--ncoef 23 contradicts", "has 30")),
        (["--latent-size", "32"], ("--latent-size 32 contradicts", "has 16")),
        (["--channels", "512"], ("--channels 512 does not apply", "TDNN model takes no --channels")),
    ],
)
def test_item23_typed_flag_contradicting_the_checkpoint_names_both(d, tmp_path, capsys, extra, words):
    out = str(tmp_path / "cp")
    line = refused(train.main, fine_tune_speech(d, out, *extra), out, capsys, *words)
    assert d["cp_speech"] in line


def test_item23_checkpoint_is_read_before_the_data(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    argv = [*fine_tune_speech(d, out), "--pretrained-path", str(tmp_path / "missing.pt")]
    line = refused(train.main, argv, out, capsys, "missing.pt")
    assert "coefficients" not in line and "--ncoef" not in line


def test_item23_data_of_another_coefficient_count_names_the_checkpoint(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    line = refused(train.main, fine_tune_speech(d, out, data="h5_23"), out, capsys, "ncoef 23", "takes 30")
    assert d["cp_speech"] in line and "--ncoef is" not in line


def test_item23_typed_flag_equal_to_the_encoders_default_is_fine(d, tmp_path):
    """A resnet checkpoint trained without --width records none: its width is the encoder's default, 64."""
    argv = ["--data-path", d["images"], "--pretrained-path", d["cp_resnet"], "--width", "64", "--epochs", "1",
            "--batch-size", "10", "--checkpoint-path", str(tmp_path / "cp"), "--verbose", "0"]  # fmt: skip
    assert build(argv).args.width == 64
    assert snapshot(str(tmp_path / "cp")) == {}
