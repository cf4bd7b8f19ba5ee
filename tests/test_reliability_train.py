"""Training meets bad data and bad flags early, with one line, and resumes exactly.

Each refusal runs train.py's `cli(main)` in this process (as the command line does): one line on stderr, a
non-zero exit, no traceback, and nothing written to the output folder. The resume cases compare every tensor
of a resumed run with an uninterrupted one, with data-loader worker processes.
"""

import json
import os
import struct

import h5py
import numpy as np
import pytest
from PIL import Image
from test_resume import assert_same
from tiny_data import make_image_tree

import hp_search
import train
from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint
from utils import cli

NCOEF = 30


def write_hdf5(path, speakers=4, utts=5, frames=40, odd=None, nan=None, seed=0):
    """A speaker HDF5 as data_prep.py writes it ((ncoef, frames) float32 per utterance, `ncoef` attribute).

    `odd` = (speaker, utterance, shape) stores that utterance with another shape; `nan` = (speaker,
    utterance) puts NaNs into that utterance (one coefficient, every frame).
    """
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        h5.attrs["ncoef"] = NCOEF
        for s in range(speakers):
            group = h5.create_group(f"s{s}")
            offset = rng.normal(size=(NCOEF, 1))
            for u in range(utts):
                shape = odd[2] if odd and odd[:2] == (s, u) else (NCOEF, frames)
                data = (offset + rng.normal(size=(NCOEF, frames))).astype(np.float32)
                data = data.reshape(shape) if odd and odd[:2] == (s, u) and np.prod(shape) == data.size else data
                data = rng.normal(size=shape).astype(np.float32) if data.shape != tuple(shape) else data
                if nan == (s, u):
                    data[3] = np.nan
                group.create_dataset(f"s{s}-{u}", data=data)
    return path


def write_idx(folder, n_classes=4, per_class=10, size=8, seed=0):
    """Fashion-MNIST-style IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte): grayscale images."""
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes, dtype=np.uint8), per_class)
    images = rng.integers(0, 256, size=(len(labels), size, size), dtype=np.uint8)
    with open(os.path.join(folder, "train-images-idx3-ubyte"), "wb") as handle:
        handle.write(struct.pack(">IIII", 0x803, len(labels), size, size) + images.tobytes())
    with open(os.path.join(folder, "train-labels-idx1-ubyte"), "wb") as handle:
        handle.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())
    return folder


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Inputs shared by the cases (read-only for them)."""
    root = tmp_path_factory.mktemp("reliability")
    paths = {"images": make_image_tree(str(root / "images"), n_classes=4, per_class=10)}
    paths["valid"] = make_image_tree(str(root / "valid"), n_classes=4, per_class=12, seed=1)
    for name, damage in (("zero_byte", b""), ("not_image", b"no image here\n"), ("truncated", None)):
        folder = make_image_tree(str(root / name), n_classes=4, per_class=10)
        target = os.path.join(folder, "class2", "3.png")
        damage = open(target, "rb").read()[:60] if damage is None else damage
        open(target, "wb").write(damage)
        paths[name] = folder
    paths["sizes"] = make_image_tree(str(root / "sizes"), n_classes=4, per_class=10)
    Image.new("RGB", (10, 10)).save(os.path.join(paths["sizes"], "class1", "4.png"))
    paths["idx"] = write_idx(str(root / "idx"))
    paths["h5"] = write_hdf5(str(root / "train.h5"))
    paths["h5_valid"] = write_hdf5(str(root / "valid.h5"), seed=1)
    paths["h5_reshaped"] = write_hdf5(str(root / "reshaped.h5"), odd=(1, 2, (20, 60)))  # 20x60 = 30x40
    paths["h5_odd"] = write_hdf5(str(root / "odd.h5"), odd=(2, 0, (20, 61)))
    paths["h5_nan"] = write_hdf5(str(root / "nan.h5"), nan=(1, 3))
    paths["h5_valid_nan"] = write_hdf5(str(root / "valid_nan.h5"), nan=(0, 1), seed=1)
    return paths


def image_argv(data, out, *extra):
    return ["--data-path", data, "--model", "resnet", "--width", "8", "--hidden-size", "32", "--epochs", "1",
            "--batch-size", "10", "--device", "cpu", "--checkpoint-path", out, "--verbose", "0", *extra]  # fmt: skip


def speech_argv(train_file, out, *extra):
    return ["--train-hdf-file", train_file, "--model", "TDNN", "--ncoef", str(NCOEF), "--n-frames", "20",
            "--latent-size", "16", "--hidden-size", "32", "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--lr", "0.5", "--warmup", "2", "--device", "cpu", "--checkpoint-path", out, "--verbose", "0",
            *extra]  # fmt: skip


def snapshot(folder):
    """{relative path: bytes} of the files under `folder` (missing folder: {})."""
    found = {}
    for here, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(here, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def refused(main, argv, out, capsys, *words):
    """Run `cli(main, argv)`: it must exit non-zero with one stderr line holding `words`, writing nothing to `out`."""
    before = snapshot(out)
    with pytest.raises(SystemExit) as done:
        cli(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.value.code not in (0, None), err
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]
    assert snapshot(out) == before, sorted(set(snapshot(out)) - set(before))
    return lines[0]


def fit(argv):
    return training.fit(training.build(training.build_parser().parse_args(argv), argv))


# ----------------------------------------------------------------------------- items 1 and 2: exact resume


def resume_argv(kind, d, out, *extra):
    if kind == "speech":
        return speech_argv(d["h5"], out, "--valid-hdf-file", d["h5_valid"], *extra)
    return image_argv(d["images"], out, "--valid-data-path", d["valid"], *extra)


@pytest.mark.parametrize(
    "kind, keep, workers, seed", [("speech", "0", "2", "6"), ("image", "1", "2", "6"), ("image", "1", "0", "4")]
)
def test_resume_with_workers_is_exact_and_keeps_the_best_checkpoint(d, tmp_path, kind, keep, workers, seed):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    flags = ["--keep-checkpoints", keep, "--workers", workers, "--seed", seed]
    fit(resume_argv(kind, d, straight, "--epochs", "2", *flags))
    fit(resume_argv(kind, d, resumed, "--epochs", "1", *flags))
    fit(resume_argv(kind, d, resumed, "--epochs", "2", "--checkpoint-epoch", "1", *flags))
    a, b = (load_checkpoint(os.path.join(cp, "checkpoint_2ep.pt")) for cp in (straight, resumed))
    if keep == "1":  # the best e2e EER came at epoch 1: pruning after the resume must keep its file (item 1)
        e2e = a["history"]["e2e_eer"]
        assert e2e[0] < min(e2e[1:]), e2e  # what this case is about (fixed seed, deterministic)
        assert sorted(f for f in os.listdir(resumed) if f.endswith(".pt")) == ["checkpoint_1ep.pt", "checkpoint_2ep.pt"]
        assert a["best_checkpoint"] == b["best_checkpoint"] == "checkpoint_1ep.pt"
    assert sorted(os.listdir(straight)) == sorted(os.listdir(resumed))
    for key in ("model_state", "optimizer_state", "scheduler_state", "total_iters", "history", "best"):  # item 2
        assert_same(a[key], b[key], key)


def test_resume_with_another_lr_schedule_is_one_line(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    fit(image_argv(d["images"], out))
    argv = image_argv(d["images"], out, "--epochs", "2", "--checkpoint-epoch", "1", "--lr-schedule", "noam")
    refused(train.main, argv, out, capsys, "--lr-schedule plateau, not noam")


# ----------------------------------------------------------------------------- items 3 and 4: batches, validation


def test_capped_validation_is_drawn_over_all_classes_before_training(d, tmp_path, capsys):
    argv = image_argv(d["images"], str(tmp_path / "cp"), "--valid-data-path", d["valid"], "--valid-max-items", "12")
    run = training.build(training.build_parser().parse_args(argv), argv)
    labels = np.asarray(run.datasets[1].labels)
    assert len(labels) == 12 and np.bincount(labels).tolist() == [3, 3, 3, 3]
    training.fit(run)
    assert np.isfinite(run.trainer.history["e2e_eer"][0])
    out = str(tmp_path / "one")
    argv = image_argv(d["images"], out, "--valid-data-path", d["valid"], "--valid-max-items", "3")
    refused(train.main, argv, out, capsys, "validation set", "two classes")


@pytest.mark.parametrize("kind, batch, smallest", [("image", "9", "10"), ("speech", "1", "2")])
def test_batches_of_one_class_are_refused(d, tmp_path, capsys, kind, batch, smallest):
    out = str(tmp_path / "cp")
    argv = image_argv(d["images"], out) if kind == "image" else speech_argv(d["h5"], out)
    refused(train.main, [*argv, "--batch-size", batch], out, capsys, f"--batch-size {smallest} or more")


# ----------------------------------------------------------------------------- items 5 and 20: flags


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--epoch", "1", "--batch", "50"], "unrecognized arguments: --epoch 1 --batch 50"),
        (["--checkpoint-pat", "X"], "unrecognized arguments: --checkpoint-pat X"),
        (["--cp-name", "sub/x.pt"], "--cp-name must be a file name"),
        (["--smoothing", "2"], "--smoothing must be in [0, 1)"),
        (["--smoothing", "1"], "--smoothing must be in [0, 1)"),
    ],
)
def test_bad_flags_are_one_line_before_training(d, tmp_path, capsys, extra, words):
    out = str(tmp_path / "cp")
    refused(train.main, [*image_argv(d["images"], out), *extra], out, capsys, words)


# ----------------------------------------------------------------------------- items 7, 14, 16, 17: speaker HDF5


@pytest.mark.parametrize("name, utt", [("h5_reshaped", "s1/s1-2 has shape (20, 60)"), ("h5_odd", "s2/s2-0")])
def test_utterance_of_another_shape_is_refused_when_the_file_is_opened(d, tmp_path, capsys, name, utt):
    out = str(tmp_path / "cp")
    refused(train.main, speech_argv(d[name], out), out, capsys, utt, f"not ({NCOEF}, frames)")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_nan_in_training_features_names_the_utterance_in_one_line(d, tmp_path, capsys, workers):
    out = str(tmp_path / "cp")
    line = refused_training(train.main, speech_argv(d["h5_nan"], out, "--workers", workers), out, capsys)
    assert "s1/s1-3 holds NaN or Inf" in line and d["h5_nan"] in line and "loss became" not in line


def test_nan_in_validation_features_names_the_utterance_in_one_line(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    argv = speech_argv(d["h5"], out, "--valid-hdf-file", d["h5_valid_nan"], "--workers", "2")
    line = refused_training(train.main, argv, out, capsys)
    assert "s0/s0-1 holds NaN or Inf" in line and "scores contain" not in line


def refused_training(main, argv, out, capsys):
    """Like `refused`, for errors found once training runs: args.json may be there, but no checkpoint."""
    with pytest.raises(SystemExit) as done:
        cli(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert set(snapshot(out)) <= {"args.json"}
    return lines[0]


# ----------------------------------------------------------------------------- items 9 and 10: image files


@pytest.mark.parametrize("name", ["zero_byte", "not_image", "truncated"])
def test_undecodable_image_is_refused_before_training(d, tmp_path, capsys, name):
    out = str(tmp_path / "cp")
    bad = os.path.join(d[name], "class2", "3.png")
    refused(train.main, image_argv(d[name], out, "--workers", "2"), out, capsys, bad, "--skip-bad-images")
    refused(train.main, image_argv(d["images"], out, "--valid-data-path", d[name]), out, capsys, bad)


def test_skip_bad_images_leaves_them_out_with_a_warning(d, tmp_path, capsys):
    argv = image_argv(d["truncated"], str(tmp_path / "cp"), "--skip-bad-images", "--no-cp")
    run = fit(argv)
    assert len(run.datasets[0]) == 39
    assert "left out 1 image(s) that cannot be decoded" in capsys.readouterr().err


def test_images_of_another_size_are_refused_before_training(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    odd = os.path.join(d["sizes"], "class1", "4.png")
    refused(train.main, image_argv(d["sizes"], out), out, capsys, "images differ in size", odd, "(10x10)")


def test_rgb_validation_for_grayscale_training_is_refused_before_training(d, tmp_path, capsys):
    out = str(tmp_path / "cp")
    argv = image_argv(d["idx"], out, "--valid-data-path", d["images"])
    refused(train.main, argv, out, capsys, "validation images", "have 3 channel(s) but the training images have 1")


def test_a_failing_trial_is_recorded_as_failed_and_the_search_goes_on(d, tmp_path):
    cp = tmp_path / "cp"
    (cp / "trial_0000" / "args.json").mkdir(parents=True)  # trial 0 cannot write its args.json: an OSError
    argv = ["--data-path", d["images"], "--valid-data-path", d["valid"], "--model", "resnet", "--epochs", "1",
            "--batch-size", "10", "--device", "cpu", "--budget", "2", "--checkpoint-path", str(cp)]  # fmt: skip
    assert hp_search.main(argv) == 0
    events = [json.loads(line) for line in open(cp / "hp_trials.jsonl")]
    ends = {e["trial"]: e for e in events if e["event"] == "end"}
    assert [ends[t]["status"] for t in (0, 1)] == ["failed", "ok"]
    assert "IsADirectoryError" in ends[0]["error"]
