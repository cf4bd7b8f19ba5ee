"""The image-recipe switches: --augment, --final-norm, --pair-weight, --sampler, --softmax-scale.

Each flag at its default (or set to what the source did anyway) trains exactly as before; each flag
turned on changes what it says and nothing else.
"""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_data import make_image_tree

import data_load
import models
from e2e_verification import training
from e2e_verification.checkpoints import load_model
from losses import SoftmaxHead, build_head, pair_loss
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = data_load.FASHION_DIR  # the installed Fashion-MNIST IDX folder


def digits_run(tmp_path, *extra, cp=False):
    """A built (not yet trained) one-epoch run on the bundled digits with a 4-channel resnet."""
    argv = ["--epochs", "1", "--width", "4", "--verbose", "0", "--device", "cpu", "--checkpoint-path", str(tmp_path)]
    argv += [] if cp else ["--no-cp"]
    argv += list(extra)
    return training.build(training.build_parser().parse_args(argv), argv)


def trained_weights(tmp_path, *extra):
    run = training.fit(digits_run(tmp_path, *extra))
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def write_idx(folder, prefix, images, labels):
    """Uncompressed IDX files (the MNIST format): `prefix`-images-idx3-ubyte and `prefix`-labels-idx1-ubyte."""
    n, h, w = images.shape
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as handle:
        handle.write(struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as handle:
        handle.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    """20 random 6x6 grey images of 2 classes as IDX train and t10k files."""
    folder = str(tmp_path_factory.mktemp("idx"))
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(folder, prefix, rng.integers(1, 256, (20, 6, 6)), np.arange(20) % 2)
    return folder


def shifts(x, pad):
    """Every zero-padded shift of (C, H, W) by up to `pad` pixels, as the random crop makes them."""
    h, w = x.shape[1:]
    padded = F.pad(x, (pad,) * 4)
    return [padded[:, t : t + h, s : s + w] for t in range(2 * pad + 1) for s in range(2 * pad + 1)]


def kinds_drawn(dataset, original, pad, draws=200):
    """Which of 'plain' (a shift of the original) and 'flipped' (a shift of its mirror image) the draws gave."""
    plain, flipped = shifts(original, pad), shifts(original.flip(-1), pad)
    seen = set()
    for _ in range(draws):
        x, _ = dataset[0]
        if any(torch.equal(x, s) for s in plain):
            seen.add("plain")
        elif any(torch.equal(x, s) for s in flipped):
            seen.add("flipped")
        else:
            seen.add("other")
    return seen


# ----------------------------------------------------------------------------- flags off: today's training


def test_settings_equal_to_todays_train_the_same_weights_and_others_do_not(tmp_path):
    """The digits crop but never flip: --augment crop and every other flag at its default are today's run."""
    torch.manual_seed(0)
    today = trained_weights(tmp_path / "a")
    same = trained_weights(
        tmp_path / "b", "--augment", "crop", "--sampler", "balanced", "--pair-weight", "1", "--softmax-scale", "1"
    )
    assert today.keys() == same.keys()
    assert all(torch.equal(today[k], same[k]) for k in today)
    other = trained_weights(tmp_path / "c", "--pair-weight", "0.5")
    assert not all(torch.equal(today[k], other[k]) for k in today)


# ----------------------------------------------------------------------------- --augment


def test_idx_training_images_crop_and_flip_by_default_and_augment_switches_each(idx_folder):
    train_set = data_load.load_images(idx_folder, "train")
    original = train_set.images[0]
    assert kinds_drawn(train_set, original, 2) == {"plain", "flipped"}  # auto: crop + flip, as before
    data_load.set_augmentation(train_set, "crop")
    assert kinds_drawn(train_set, original, 2) == {"plain"}  # never flipped
    data_load.set_augmentation(train_set, "none")
    assert all(torch.equal(train_set[0][0], original) for _ in range(20))
    data_load.set_augmentation(train_set, "flip")
    assert kinds_drawn(train_set, original, 0) == {"plain", "flipped"}
    data_load.set_augmentation(train_set, "crop+flip")
    assert kinds_drawn(train_set, original, 2) == {"plain", "flipped"}


def test_a_test_split_refuses_a_crop(idx_folder):
    with pytest.raises(UserError, match="no crop padding"):
        data_load.set_augmentation(data_load.load_images(idx_folder, "test"), "crop")


def test_image_folder_augment_none_gives_the_unaugmented_image(tmp_path):
    folder = make_image_tree(str(tmp_path / "tree"), n_classes=2, per_class=3, size=8)
    plain = data_load.FolderImages(folder, train=False)[0][0]
    train_set = data_load.FolderImages(folder, train=True)
    assert kinds_drawn(train_set, plain, 4, draws=60) == {"plain", "flipped"}
    data_load.set_augmentation(train_set, "crop")
    assert kinds_drawn(train_set, plain, 4, draws=60) == {"plain"}
    data_load.set_augmentation(train_set, "none")
    assert all(torch.equal(train_set[0][0], plain) for _ in range(10))


def test_train_flag_reaches_the_training_images(tmp_path):
    run = digits_run(tmp_path, "--augment", "flip")
    images = run.datasets[0]
    images = getattr(images, "dataset", images)
    assert images.flip and images.pad == 0
    default = digits_run(tmp_path).datasets[0]
    default = getattr(default, "dataset", default)
    assert not default.flip and default.pad == 1  # the digits' own augmentation


@pytest.mark.parametrize("flags", [["--augment", "none"], ["--sampler", "random"], ["--final-norm"]])
def test_image_only_flags_are_refused_for_speech(flags):
    args = training.build_parser().parse_args(["--train-hdf-file", "x.hdf", *flags])
    with pytest.raises(UserError, match="images|image resnet"):
        training.resolve_defaults(args, [])


# ----------------------------------------------------------------------------- --final-norm


def test_final_norm_adds_bn_relu_and_the_checkpoint_rebuilds_it(tmp_path):
    plain = digits_run(tmp_path / "a").model
    assert plain.encoder.final is None
    assert "final_norm" not in plain.config["encoder_args"]
    assert not any("final" in k for k in plain.state_dict())
    run = training.fit(digits_run(tmp_path / "b", "--final-norm", cp=True))
    final = run.model.encoder.final
    assert isinstance(final[0], torch.nn.BatchNorm2d) and isinstance(final[1], torch.nn.ReLU)
    assert run.model.config["encoder_args"]["final_norm"] is True
    loaded = load_model(str(tmp_path / "b" / "checkpoint_1ep.pt"))
    x = torch.randn(5, 1, 8, 8)
    run.model.eval()
    with torch.no_grad():
        emb = loaded.embed(x)
        assert torch.equal(emb, run.model.embed(x))
    assert (emb >= 0).all()  # pooled after a ReLU


def test_final_norm_is_refused_by_encoders_without_it(tmp_path):
    with pytest.raises(UserError, match="does not take these settings"):
        digits_run(tmp_path, "--model", "densenet", "--final-norm")


# ----------------------------------------------------------------------------- --pair-weight


def first_batch(run):
    return next(iter(run.trainer.train_loader))


def test_pair_weight_zero_gives_the_distance_no_gradient(tmp_path):
    run = digits_run(tmp_path, "--pair-weight", "0")
    total, ce, bce, _ = run.trainer.train_step(*first_batch(run))
    assert total == ce and bce > 0
    assert all(p.grad is None for p in run.model.distance.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.model.encoder.parameters())


def test_pair_weight_scales_the_pair_loss(tmp_path):
    run = digits_run(tmp_path, "--pair-weight", "0.25")
    total, ce, bce, _ = run.trainer.train_step(*first_batch(run))
    assert total == pytest.approx(ce + 0.25 * bce, rel=1e-6)
    assert all(p.grad.abs().sum() > 0 for p in run.model.distance.parameters())


def test_ablation_without_pair_loss_is_refused(tmp_path):
    with pytest.raises(UserError, match="no loss"):
        digits_run(tmp_path, "--ablation", "--pair-weight", "0")


# ----------------------------------------------------------------------------- --sampler random


def test_random_batches_use_every_item_once_shuffled_per_epoch():
    labels = np.repeat(np.arange(5), 20)  # 100 items
    sampler = data_load.RandomBatchSampler(labels, 16, seed=3)
    batches = list(sampler)
    assert [len(b) for b in batches] == [16] * 6 + [4]
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert list(data_load.RandomBatchSampler(labels, 16, seed=3)) == batches  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_random_batches_drop_a_single_item_tail_and_split_over_ranks():
    labels = np.arange(33) % 3
    assert [len(b) for b in data_load.RandomBatchSampler(labels, 8)] == [8, 8, 8, 8]
    ranks = [list(data_load.RandomBatchSampler(labels, 4, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert not set(i for b in ranks[0] for i in b) & set(i for b in ranks[1] for i in b)


def test_train_builds_random_batches_of_batch_size_items(tmp_path):
    run = digits_run(tmp_path, "--sampler", "random", "--batch-size", "64")
    sampler = run.trainer.train_loader.batch_sampler
    assert isinstance(sampler, data_load.RandomBatchSampler)
    sizes = [len(b) for b in sampler]
    assert sizes[:-1] == [64] * (len(sizes) - 1) and sum(sizes) == len(run.datasets[0])
    loss, ce, bce, _ = run.trainer.train_step(*first_batch(run))
    assert np.isfinite([loss, ce, bce]).all()


def test_pair_loss_of_a_batch_without_positives_is_the_negatives_bce():
    logits = torch.randn(1, 6, requires_grad=True)
    same = torch.zeros(6, dtype=torch.bool)
    loss = pair_loss(logits, same)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits[0], torch.zeros(6)).item(), 1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_pair_loss_gives_a_lone_positive_half_the_weight():
    logits = torch.randn(1, 5)
    same = torch.tensor([True, False, False, False, False])
    bce = F.binary_cross_entropy_with_logits(logits[0], same.float(), reduction="none")
    assert pair_loss(logits, same).item() == pytest.approx(0.5 * bce[0].item() + 0.5 * bce[1:].mean().item(), 1e-6)


# ----------------------------------------------------------------------------- --softmax-scale


def test_softmax_scale_one_is_the_research_head_and_scale_multiplies_the_cosine_part():
    torch.manual_seed(0)
    head = SoftmaxHead(8, 3)
    torch.nn.init.normal_(head.linear.bias)
    emb = torch.randn(4, 8)
    logits = head(emb)
    assert torch.allclose(logits, head.linear(F.normalize(emb, dim=1)))
    bound = head.linear.weight.norm(dim=1) + head.linear.bias.abs()
    assert (logits.abs() <= bound + 1e-6).all()  # why the research head learns slowly
    scaled = build_head("softmax", 8, 3, softmax_scale=30.0)
    scaled.load_state_dict(head.state_dict())
    bias = head.linear.bias
    assert torch.allclose(scaled(emb) - bias, 30 * (logits - bias), atol=1e-5)


def test_softmax_scale_is_recorded_and_old_checkpoints_mean_scale_one(tmp_path):
    run = digits_run(tmp_path, "--softmax", "softmax", "--softmax-scale", "30")
    assert run.model.config["softmax_scale"] == 30.0 and run.model.classifier.scale == 30.0
    old = {k: v for k, v in run.model.config.items() if k != "softmax_scale"}
    assert models.build_model(old).classifier.scale == 1.0


# ----------------------------------------------------------------------------- the bench


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_learning_speed_bench_runs_small(tmp_path):
    out = tmp_path / "table.md"
    argv = ["--rows", "baseline,research", "--seeds", "1", "--epochs", "2", "--early-epoch", "1", "--width", "4"]
    argv += ["--train-items-per-class", "10", "--test-items-per-class", "5", "--scorers", "cos"]
    argv += ["--work-dir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "experiments/learning_speed.py", *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-1000:]
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| baseline | 1 |") and lines[3].startswith("| research | 1 |")
