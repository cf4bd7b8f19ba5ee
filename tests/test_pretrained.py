"""train.py --pretrained-path: fine-tuning from a checkpoint's encoder and learned distance, with a new head."""

import os

import pytest
import torch
from tiny_data import make_image_tree

import train
from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint
from e2e_verification.frontend import FrontEnd
from e2e_verification.pretrained import pretrained_config
from utils import UserError

ARCH = ["--model", "resnet", "--width", "8", "--hidden-size", "16", "--n-hidden", "2", "--ndiscriminators", "2"]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A 4-class tree to pretrain on (one epoch of a small ResNet), and a 3-class tree of other images to fine-tune."""
    root = tmp_path_factory.mktemp("pretrained")
    paths = {
        "pre": make_image_tree(str(root / "pre"), n_classes=4, per_class=10, seed=0),
        "new": make_image_tree(str(root / "new"), n_classes=3, per_class=10, seed=5),
    }
    cp = str(root / "cp")
    argv = ["--data-path", paths["pre"], "--checkpoint-path", cp, "--epochs", "1", "--batch-size", "20",
            "--lr", "0.05", "--verbose", "0", "--softmax", "am_softmax", *ARCH]  # fmt: skip
    assert train.main(argv) == 0
    paths["cp"] = os.path.join(cp, "checkpoint_1ep.pt")
    return paths


def fine_tune_argv(d, out, *extra):
    return ["--data-path", d["new"], "--pretrained-path", d["cp"], "--checkpoint-path", str(out), "--epochs", "1",
            "--batch-size", "15", "--lr", "0.05", "--verbose", "0", *extra]  # fmt: skip


def test_fine_tuning_copies_encoder_and_distance_and_builds_a_new_head(d, tmp_path):
    argv = fine_tune_argv(d, tmp_path / "ft")
    run = training.build(training.build_parser().parse_args(argv), argv)
    config = run.model.config
    arch = (config["model"], config["hidden_size"], config["n_hidden"], config["ndiscriminators"])
    assert arch == ("resnet", 16, 2, 2)  # from the checkpoint; the flags' defaults would give 512, 1, 1
    assert config["encoder_args"]["width"] == 8 and config["n_classes"] == 3 and config["softmax"] == "softmax"
    old = load_checkpoint(d["cp"])["model_state"]
    new = run.model.state_dict()
    copied = [k for k in new if k.startswith(("encoder.", "distance."))]
    assert len(copied) > 20
    for key in copied:
        assert torch.equal(new[key], old[key]), key
    assert new["classifier.linear.weight"].shape[0] == 3 and old["classifier.weight"].shape[0] == 4  # a new head
    assert train.main(argv) == 0  # and it trains, saving the checkpoint's architecture with the new classes
    saved = load_checkpoint(str(tmp_path / "ft" / "checkpoint_1ep.pt"))["model_config"]
    assert saved["hidden_size"] == 16 and saved["n_classes"] == 3 and saved["image_input"]["source"] == "folder"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hidden-size", "32"], "--hidden-size 32 contradicts"),
        (["--width", "16"], "--width 16 contradicts"),
        (["--model", "densenet"], "--model densenet contradicts"),
        (["--pair-features", "sym"], "--pair-features sym contradicts"),
    ],
)
def test_flags_contradicting_the_checkpoint_are_one_error(d, tmp_path, flags, message):
    argv = fine_tune_argv(d, tmp_path / "ft", *flags)
    with pytest.raises(UserError, match=message):
        training.build(training.build_parser().parse_args(argv), argv)
    assert not (tmp_path / "ft").exists()


def test_flags_repeating_the_checkpoint_are_fine(d, tmp_path):
    argv = fine_tune_argv(d, tmp_path / "ft", *ARCH)
    assert training.build(training.build_parser().parse_args(argv), argv).model.config["hidden_size"] == 16


def test_data_and_front_end_must_fit_the_encoder():
    state = {"model_config": {"model": "TDNN", "encoder_args": {"ncoef": 30, "latent_size": 64}, "frontend": None}}
    run = {"n_classes": 5, "softmax": "softmax", "margin": 0.35, "scale": 30.0, "dropout_prob": 0.1}
    run |= {"detach_distance": False, "model": "TDNN", "encoder_args": {"ncoef": 30, "latent_size": 256}}
    mfcc, fbank = FrontEnd.mfcc(30, 8000).to_dict(), FrontEnd.fbank(30, 8000).to_dict()
    out = pretrained_config("cp.pt", state, run | {"frontend": mfcc}, typed=set())
    assert out["encoder_args"]["latent_size"] == 64 and out["frontend"] == mfcc and out["n_classes"] == 5
    with pytest.raises(UserError, match="--latent-size 256 contradicts"):
        pretrained_config("cp.pt", state, run, typed={"--latent-size"})
    state["model_config"]["frontend"] = fbank
    with pytest.raises(UserError, match="front end differs: kind fbank vs mfcc"):
        pretrained_config("cp.pt", state, run | {"frontend": mfcc}, typed=set())
    assert pretrained_config("cp.pt", state, run | {"frontend": None}, set())["frontend"] == fbank  # unknown: kept
    with pytest.raises(UserError, match="gives ncoef 20 but the model of cp.pt takes 30"):
        pretrained_config("cp.pt", state, run | {"encoder_args": {"ncoef": 20}}, set())
    state = {"model_config": {"model": "resnet", "encoder_args": {"in_channels": 1, "stem": "cifar"}}}
    with pytest.raises(UserError, match="gives in_channels 3 but the model of cp.pt takes 1"):
        pretrained_config("cp.pt", state, run | {"encoder_args": {"in_channels": 3, "stem": "cifar"}}, set())
