"""Bad input catalog: every script meets a user mistake with one line on stderr, a non-zero exit, no traceback,
and nothing (no output file, no temporary file) left in its output folder.

Each case runs the real script in a fresh interpreter (sys.executable), in an empty output folder.
"""

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from tiny_data import make_image_tree, write_checkpoint, write_kaldi_dir, write_speaker_hdf5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TDNN_ARGS = {"ncoef": 23, "latent_size": 16}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Inputs, good and bad, shared by the cases (read-only for them)."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = {"root": str(root)}
    paths["images"] = make_image_tree(str(root / "images"), n_classes=3, per_class=6)
    paths["singletons"] = make_image_tree(str(root / "singletons"), n_classes=3, per_class=1)
    os.makedirs(root / "empty")
    paths["empty"] = str(root / "empty")
    for name, files in (("idx_no_labels", ["images"]), ("idx_short", ["images", "labels"])):
        os.makedirs(root / name)
        for kind in files:
            (root / name / f"train-{kind}-idx{3 if kind == 'images' else 1}-ubyte").write_bytes(b"\x00\x00\x08\x03\x00")
        paths[name] = str(root / name)
    paths["cp"] = write_checkpoint(str(root / "densenet.pt"))
    whole = open(paths["cp"], "rb").read()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    paths["truncated"] = str(root / "truncated.pt")
    torch.save({"weights": torch.ones(3)}, str(root / "other.pt"))
    paths["other"] = str(root / "other.pt")
    paths["tdnn"] = write_checkpoint(str(root / "tdnn.pt"), "TDNN", n_classes=3, encoder_args=TDNN_ARGS)
    paths["tdnn30"] = write_checkpoint(str(root / "tdnn30.pt"), "TDNN", 3, {"ncoef": 30, "latent_size": 16})
    paths["kaldi"] = str(root / "kaldi")
    paths["utts"] = list(write_kaldi_dir(paths["kaldi"], ncoef=23))
    paths["kaldi30"] = str(root / "kaldi30")
    write_kaldi_dir(paths["kaldi30"], ncoef=30)
    paths["kaldi_nan"] = str(root / "kaldi_nan")
    write_kaldi_dir(paths["kaldi_nan"], ncoef=23, nan_utt=1)
    trials = {
        "unknown": "spk0-u0 spk1-u0 nontarget\nspk0-u0 nobody-1 target\n",
        "label": "spk0-u0 spk0-u1 same\n",
        "empty": "",
    }
    for name, text in trials.items():
        (root / f"trials_{name}").write_text(text)
        paths[f"trials_{name}"] = str(root / f"trials_{name}")
    paths["h5_empty"] = write_speaker_hdf5(str(root / "empty.h5"), {})
    paths["h5_single"] = write_speaker_hdf5(str(root / "single.h5"), {f"s{i}": 1 for i in range(4)}, ncoef=23)
    paths["h5_30"] = write_speaker_hdf5(str(root / "ncoef30.h5"), {f"s{i}": 6 for i in range(3)}, ncoef=30)
    (root / "not.h5").write_text("speaker utterance\n")
    paths["not_h5"] = str(root / "not.h5")
    (root / "run_hp.sh").write_text(open(os.path.join(ROOT, "run_hp_slurm.sh")).read())
    os.chmod(root / "run_hp.sh", stat.S_IRUSR | stat.S_IWUSR)
    paths["sub_noexec"] = str(root / "run_hp.sh")
    return paths


def train(d, out, *argv):
    return "train.py", ["--checkpoint-path", out, "--device", "cpu", "--epochs", "1", *argv]


def train_images(d, out, *argv):
    return train(d, out, "--data-path", d["images"], *argv)


def resume_other_model(d, out):
    shutil.copy(d["cp"], os.path.join(out, "checkpoint_1ep.pt"))  # a densenet checkpoint
    return train_images(d, out, "--model", "resnet", "--checkpoint-epoch", "1", "--epochs", "2")


def evaluate(d, out, *argv):
    return "eval.py", ["--device", "cpu", "--out-path", os.path.join(out, "scores.out"), *argv]


def eval_speech(d, out, trials, cp="tdnn"):
    return evaluate(d, out, "--cp-path", d[cp], "--test-data", d["kaldi"], "--trials-path", trials)


def hp_slurm(d, out, sub_file):
    argv = ["--sub-file", sub_file, "--temp-folder", os.path.join(out, "temp"), "--checkpoint-path", out]
    return "hp_search_slurm.py", [*argv, "--budget", "1", "--device", "cpu"]


def snapshot(folder):
    """{relative path: bytes, or None for a folder} of everything under `folder`."""
    found = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(here, name), folder)] = None
        for name in files:
            found[os.path.relpath(os.path.join(here, name), folder)] = open(os.path.join(here, name), "rb").read()
    return found


# (id, builder(d, out) -> (script, argv), words the one error line must hold)
CASES = [
    ("train-missing-data", lambda d, o: train(d, o, "--data-path", o + "/nowhere"), "data path not found"),
    ("train-no-images", lambda d, o: train(d, o, "--data-path", d["empty"]), "no images found"),
    ("train-idx-no-labels", lambda d, o: train(d, o, "--data-path", d["idx_no_labels"]), "labels-idx1-ubyte"),
    ("train-idx-cut-short", lambda d, o: train(d, o, "--data-path", d["idx_short"]), "truncated or damaged"),
    ("train-one-item-per-class", lambda d, o: train(d, o, "--data-path", d["singletons"]), "at least 2 classes"),
    ("train-negative-lr", lambda d, o: train_images(d, o, "--lr", "-0.1"), "--lr: must be > 0"),
    ("train-zero-frames", lambda d, o: train_images(d, o, "--n-frames", "0"), "--n-frames: must be > 0"),
    ("train-zero-batch", lambda d, o: train_images(d, o, "--batch-size", "0"), "--batch-size: must be > 0"),
    ("train-unknown-model", lambda d, o: train_images(d, o, "--model", "alexnet"), "unknown --model alexnet"),
    ("train-dropout-1.5", lambda d, o: train_images(d, o, "--dropout-prob", "1.5"), "--dropout-prob must be in"),
    ("train-cuda-maybe", lambda d, o: train_images(d, o, "--cuda", "maybe"), "--cuda"),
    ("train-bad-device", lambda d, o: train_images(d, o, "--device", "tpu:9"), "bad --device"),
    ("train-cp-path-is-file", lambda d, o: train_images(d, d["cp"]), "is a file, not a folder"),
    ("train-resume-missing", lambda d, o: train_images(d, o, "--checkpoint-epoch", "3"), "checkpoint not found"),
    ("train-resume-other-model", resume_other_model, "holds a densenet model, not resnet"),
    ("train-hdf5-no-speakers", lambda d, o: train(d, o, "--train-hdf-file", d["h5_empty"]), "holds no speakers"),
    (
        "train-hdf5-one-utt-per-speaker",
        lambda d, o: train(d, o, "--train-hdf-file", d["h5_single"]),
        "0 of 4 speakers have 5 or more",
    ),
    ("train-hdf5-ncoef", lambda d, o: train(d, o, "--train-hdf-file", d["h5_30"]), "30 coefficients per frame"),
    ("train-hdf5-not-hdf5", lambda d, o: train(d, o, "--train-hdf-file", d["not_h5"]), "not an HDF5 file"),
    ("eval-missing-cp", lambda d, o: evaluate(d, o, "--cp-path", o + "/none.pt"), "checkpoint not found"),
    ("eval-no-cp-flag", lambda d, o: evaluate(d, o), "--cp-path"),
    ("eval-truncated-cp", lambda d, o: evaluate(d, o, "--cp-path", d["truncated"]), "truncated, damaged"),
    ("eval-not-a-checkpoint", lambda d, o: evaluate(d, o, "--cp-path", d["other"]), "not a checkpoint"),
    (
        "eval-other-model",
        lambda d, o: evaluate(d, o, "--cp-path", d["cp"], "--model", "resnet", "--data-path", d["images"]),
        "--model resnet does not match",
    ),
    (
        "eval-out-folder-missing",
        lambda d, o: ("eval.py", ["--cp-path", d["cp"], "--out-path", o + "/no/scores.out", "--device", "cpu"]),
        "output folder does not exist",
    ),
    (
        "eval-plot-without-out-path",
        lambda d, o: ("eval.py", ["--cp-path", d["cp"], "--plot", "--device", "cpu", "--data-path", d["images"]]),
        "--plot",
    ),
    (
        "eval-zero-batch",
        lambda d, o: evaluate(d, o, "--cp-path", d["cp"], "--data-path", d["images"], "--batch-size", "0"),
        "--batch-size",
    ),
    ("eval-trials-unknown-ids", lambda d, o: eval_speech(d, o, d["trials_unknown"]), "nobody-1"),
    ("eval-trials-bad-label", lambda d, o: eval_speech(d, o, d["trials_label"]), "label must be target or nontarget"),
    ("eval-trials-empty", lambda d, o: eval_speech(d, o, d["trials_empty"]), "is empty"),
    ("eval-ncoef-differs", lambda d, o: eval_speech(d, o, d["kaldi"] + "/trials", "tdnn30"), "coefficients"),
    (
        "eval-nan-features",
        lambda d, o: evaluate(
            d, o, "--cp-path", d["tdnn"], "--test-data", d["kaldi_nan"], "--spk2utt", d["kaldi_nan"] + "/spk2utt"
        ),
        "NaN or Inf",
    ),
    (
        "eval-image-cp-on-speech",
        lambda d, o: evaluate(
            d, o, "--cp-path", d["cp"], "--test-data", d["kaldi"], "--trials-path", d["kaldi"] + "/trials"
        ),
        "needs a speech model",
    ),
    (
        "data-prep-nan-features",
        lambda d, o: ("data_prep.py", ["--path-to-data", d["kaldi_nan"], "--out-path", o, "--min-recordings", "1"]),
        "NaN or Inf",
    ),
    (
        "data-prep-missing-data",
        lambda d, o: ("data_prep.py", ["--path-to-data", o + "/nowhere/", "--out-path", o]),
        "not found",
    ),
    (
        "embed-image-checkpoint",
        lambda d, o: ("embed.py", ["--data", d["kaldi"], "--cp-path", d["cp"], "--out-path", o + "/emb"]),
        "needs a speech model",
    ),
    (
        "embed-missing-data",
        lambda d, o: ("embed.py", ["--data", o + "/none.scp", "--cp-path", d["tdnn"], "--out-path", o + "/emb"]),
        "not found",
    ),
    ("hp-slurm-sub-file-missing", lambda d, o: hp_slurm(d, o, o + "/none.sh"), "does not exist"),
    ("hp-slurm-sub-file-not-executable", lambda d, o: hp_slurm(d, o, d["sub_noexec"]), "not executable"),
    (
        "train-hp-out-file-folder-missing",
        lambda d, o: ("train_hp.py", ["--out-file", o + "/no/objective.txt", "--checkpoint-path", o]),
        "folder does not exist",
    ),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing(d, tmp_path, build, expected):
    out = str(tmp_path / "out")
    os.makedirs(out)
    script, argv = build(d, out)
    before = snapshot(out)
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.fail(f"{script} does not exist yet")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=out, timeout=300
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"exit 0; stdout: {done.stdout[-500:]}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{script}: error: ") and expected in lines[0], lines[0]
    after = snapshot(out)
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"


def test_the_catalog_covers_every_script_with_at_least_15_cases():
    scripts = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 15 and {"train", "eval", "data", "embed", "hp"} <= scripts
