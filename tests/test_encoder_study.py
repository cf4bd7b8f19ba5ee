"""experiments/plain_cosface.py and experiments/encoder_study.py: all-pairs cosine, the plain loop, the table."""

import itertools
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "experiments"), os.path.join(ROOT, "bench")]

import encoder_study  # noqa: E402
import plain_cosface as plain  # noqa: E402

import data_load  # noqa: E402
from e2e_verification.metrics import compute_eer  # noqa: E402


def test_cosine_pairs_are_every_pair_once_in_combinations_order():
    gen = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(11, 4, generator=gen), torch.randint(0, 3, (11,), generator=gen)
    scores, same = plain.cosine_pairs(emb, labels, rows=3)  # 3 rows a block: blocks end mid-way
    pairs = list(itertools.combinations(range(11), 2))
    expected = [float(torch.nn.functional.cosine_similarity(emb[i], emb[j], dim=0)) for i, j in pairs]
    assert np.allclose(scores.numpy(), expected, atol=1e-6)
    assert same.tolist() == [bool(labels[i] == labels[j]) for i, j in pairs]
    assert plain.cosine_metrics(emb, labels)["eer"] == compute_eer(scores, same)


def tiny_sets(n_classes=4, per_class=12):
    """Four classes of 8x8 one-channel images, each a bright square at its own place plus noise."""
    gen = torch.Generator().manual_seed(1)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = 0.3 * torch.randn(len(labels), 1, 8, 8, generator=gen)
    for i, c in enumerate(labels):
        images[i, 0, 2 * c : 2 * c + 3, 2 * c : 2 * c + 3] += 2.0
    train = data_load.TensorImages(images, labels, pad=1, name="tiny")
    held = data_load.TensorImages(images, labels, name="tiny-held")
    return plain.Sets(train, {"valid": held}, [], n_classes)


def plain_args(**changes):
    args = plain.build_parser().parse_args(["--epochs", "2", "--width", "2", "--batch-size", "8", "--lr", "0.1"])
    return type(args)(**{**vars(args), **changes})


def test_plain_loop_trains_every_encoder_weight_and_leaves_augmentation_off():
    sets = tiny_sets()
    encoder0, _ = plain.build_encoder(plain_args(), sets)
    encoder, encoder_args = plain.train_plain(plain_args(), sets, seed=3, augment="crop")
    assert encoder_args == {"in_channels": 1, "stem": "cifar", "width": 2}
    before, after = encoder0.state_dict(), encoder.state_dict()
    moved = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
    assert len(moved) == len([k for k in before if k.endswith("weight")])
    assert sets.train.pad == 0 and not encoder.training
    metrics = plain.score_encoder(encoder, sets, ["valid"])
    assert set(metrics) == {"valid"} and 0 <= metrics["valid"]["cos"]["eer"] <= 1


def test_recipe_value_takes_the_last_value_and_a_default():
    flags = ["--lr", "0.05", "--width", "16", "--lr", "0.1"]
    assert encoder_study.recipe_value(flags, "--lr", None) == "0.1"
    assert encoder_study.recipe_value(flags, "--l2", "1e-4") == "1e-4"


def test_table_shows_each_arm_over_the_plain_loop_of_the_same_seeds():
    def run(arm, seed, eer):
        scorers = {s: {"eer": eer, "mindcf_0.01": 0.5} for s in ("cos", "cos_latent")}
        return {"protocol": "fonts", "arm": arm, "seed": seed, "metrics": {"valid": scorers}}

    runs = [run("plain", 1, 0.2), run("plain", 2, 0.3), run("toolkit", 1, 0.3), run("toolkit", 2, 0.4)]
    runs.append(run("toolkit-bare", 3, 0.1))  # no plain run of seed 3: no ratio
    rows = {line.split(" | ")[2]: line for line in encoder_study.render({"runs": runs}).splitlines()[2:]}
    assert rows["toolkit"].endswith("| 1.400 |")  # (0.3 + 0.4) / (0.2 + 0.3)
    assert rows["plain"].endswith("| 1.000 |") and rows["toolkit-bare"].endswith("| - |")
    assert "0.2500 ± 0.0707" in rows["plain"]


def test_the_no_augmentation_recipe_is_the_study_s_toolkit_no_augment_arm():
    """recipes/image_noaug.args is image_small.args with --augment none: the flags of the arm that was measured."""
    import benchlib

    kind, flags = encoder_study.ARMS["toolkit-no-augment"]
    assert kind == "toolkit" and benchlib.recipe("image_small") + flags == benchlib.recipe("image_noaug")
