"""Open-set protocols and the learned-distance variants: class selection leaks nothing, the symmetric
pair features are exactly order-invariant, the projected (fast) form equals the naive per-pair form,
and checkpoints from before the variants still load as the concatenated distance."""

import itertools

import numpy as np
import pytest
import torch
from tiny_data import model_config

import data_load
import models
from e2e_verification import training
from e2e_verification.checkpoints import load_model, save_checkpoint
from e2e_verification.scoring import score_all_pairs, score_trials
from models.verifier import LearnedDistance
from utils import UserError

EMB, HIDDEN = 12, 10


def naive_probability(distance, emb, idx_a, idx_b):
    with torch.no_grad():
        return torch.sigmoid(distance(emb[idx_a], emb[idx_b])).mean(0)


@pytest.mark.parametrize("n_hidden", [1, 3])
def test_sym_scores_are_exactly_symmetric(n_hidden, device):
    torch.manual_seed(0)
    distance = LearnedDistance(EMB, HIDDEN, n_hidden, 0.0, 2, pair_features="sym").to(device).eval()
    a, b = torch.randn(50, EMB, device=device), torch.randn(50, EMB, device=device)
    with torch.no_grad():
        assert torch.equal(distance(a, b), distance(b, a))
        emb = torch.cat([a, b])
        idx = torch.arange(50, device=device)
        assert torch.equal(distance.pair_logits(emb, idx, idx + 50), distance.pair_logits(emb, idx + 50, idx))
    concat = LearnedDistance(EMB, HIDDEN, n_hidden, 0.0, 2).to(device).eval()
    with torch.no_grad():  # the research code's distance is not (a control: the test can tell)
        assert not torch.equal(concat(a, b), concat(b, a))


@pytest.mark.parametrize("pair_features,normalize", [("sym", False), ("concat", True), ("concat", False)])
@pytest.mark.parametrize("chunk_elements", [1, 5 * 2 * HIDDEN, None])
def test_projected_equals_naive_all_pairs_and_trials(pair_features, normalize, chunk_elements, device):
    torch.manual_seed(1)
    distance = LearnedDistance(EMB, HIDDEN, 2, 0.3, 2, pair_features=pair_features, normalize=normalize)
    distance = distance.to(device).eval()
    n = 17
    emb = torch.randn(n, EMB, device=device) * 3
    labels = torch.arange(n, device=device) % 4
    scores, target = score_all_pairs(distance, emb, labels, chunk_elements=chunk_elements)
    pairs = torch.tensor(list(itertools.combinations(range(n), 2)), device=device)
    want = naive_probability(distance, emb, pairs[:, 0], pairs[:, 1])
    torch.testing.assert_close(scores["e2e"], want, atol=1e-5, rtol=0)
    assert torch.equal(target, labels[pairs[:, 0]] == labels[pairs[:, 1]])
    gen = torch.Generator().manual_seed(2)
    idx_a, idx_b = torch.randint(0, n, (60,), generator=gen), torch.randint(0, n, (60,), generator=gen)
    trials = score_trials(distance, emb, idx_a.numpy(), idx_b.numpy(), chunk_elements=chunk_elements)
    want = naive_probability(distance, emb, idx_a.to(device), idx_b.to(device))
    torch.testing.assert_close(trials["e2e"], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("detach", [False, True])
def test_sym_distance_trains_and_detach_keeps_the_pair_loss_out_of_the_encoder(detach, device):
    torch.manual_seed(0)
    config = model_config("densenet", n_classes=3, encoder_args={"in_channels": 1, "stem": "cifar"})
    config.update(pair_features="sym", detach_distance=detach)
    model = models.build_model(config).to(device).train()
    x, labels = torch.randn(6, 1, 8, 8, device=device), torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    _, pair_logits, same = model(x, labels)
    pair_logits.sum().backward()  # the pair loss alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.distance.parameters())
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    if detach:
        assert all(g is None for g in encoder_grads)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)


def test_old_checkpoints_without_pair_features_load_as_concat(tmp_path):
    torch.manual_seed(0)
    config = model_config("densenet", n_classes=3, encoder_args={"in_channels": 1, "stem": "cifar"})
    for key in ("pair_features", "distance_norm", "detach_distance"):
        config.pop(key, None)
    model = models.build_model(config).eval()
    path = str(tmp_path / "old.pt")
    save_checkpoint(path, {"model_config": config, "model_state": model.state_dict()})
    loaded = load_model(path)
    assert loaded.distance.pair_features == "concat" and not loaded.distance.heads[0].normalize
    a, b = torch.randn(4, loaded.encoder.embedding_size), torch.randn(4, loaded.encoder.embedding_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.distance(a, b), model.distance(a, b))


def test_class_selection_leaks_no_item_of_other_classes():
    full = data_load.load_images(None, "train")
    picked = data_load.select_classes(full, "0-4")
    originals = set(full.labels[picked.indices].tolist())
    assert originals == {0, 1, 2, 3, 4} and sorted(set(picked.labels.tolist())) == [0, 1, 2, 3, 4]
    assert len(picked) == int(np.isin(full.labels, [0, 1, 2, 3, 4]).sum())
    seen = {picked[i][1] for i in range(len(picked))}
    assert seen == {0, 1, 2, 3, 4}
    valid = data_load.load_images(None, "valid")  # no augmentation: items compare exactly
    held = data_load.select_classes(valid, "5-9")
    for i in range(len(held)):  # every item served is the original item, of a selected class
        x, y = held[i]
        assert torch.equal(x, valid[int(held.indices[i])][0]) and valid.labels[held.indices[i]] == y + 5
    relabelled = data_load.select_classes(full, "7,2")
    assert sorted(set(full.labels[relabelled.indices].tolist())) == [2, 7]
    assert set(relabelled.labels.tolist()) == {0, 1}
    capped = data_load.select_classes(full, None, items_per_class=3)
    assert np.bincount(capped.labels).tolist() == [3] * 10


def test_training_on_train_classes_never_reads_a_test_class(tmp_path):
    argv = ["--classes", "0-4", "--valid-classes", "5-9", "--epochs", "1", "--no-cp", "--verbose", "0"]
    argv += ["--checkpoint-path", str(tmp_path)]
    run = training.build(training.build_parser().parse_args(argv), argv)
    train_set, valid_set = run.datasets
    full_train = data_load.load_images(None, "train")
    assert set(full_train.labels[train_set.indices].tolist()) == {0, 1, 2, 3, 4}
    full_valid = data_load.load_images(None, "valid")
    assert set(full_valid.labels[valid_set.indices].tolist()) == {5, 6, 7, 8, 9}
    assert run.model.config["n_classes"] == 5
    batches = list(run.trainer.train_loader.batch_sampler)
    served = {int(train_set.original_labels[i]) for batch in batches for i in batch}
    assert served <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("spec", ["4-2", "a-b", "-1", "0,,1"])
def test_bad_class_lists_are_one_line(spec):
    with pytest.raises(UserError, match="bad class list"):
        data_load.parse_classes(spec)


def test_a_class_absent_from_the_data_is_refused():
    with pytest.raises(UserError, match="no items of class 10"):
        data_load.select_classes(data_load.load_images(None, "test"), "8-12")


def test_an_rgb_checkpoint_on_grayscale_test_images_is_one_line(tmp_path, capsys):
    from tiny_data import write_checkpoint

    import eval as eval_script

    cp = write_checkpoint(str(tmp_path / "rgb.pt"), encoder_args={"in_channels": 3, "stem": "cifar"})
    with pytest.raises(UserError, match="channel"):  # the digits are grayscale
        eval_script.main(["--cp-path", cp, "--device", "cpu", "--no-score-file"])
