"""Losses recomputed by hand (pytorch-metric-learning's habit)."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss

from losses import (
    HEADS,
    AAMSoftmax,
    AMSoftmax,
    SoftmaxHead,
    batch_pairs,
    build_head,
    label_smoothing_ce,
    pair_loss,
    pair_weights,
)


def test_am_softmax_matches_hand_computation():
    torch.manual_seed(0)
    head = AMSoftmax(4, 3, margin=0.2, scale=10.0)
    emb = torch.randn(2, 4)
    labels = torch.tensor([2, 0])
    w = head.weight.detach()
    expected = torch.zeros(2, 3)
    for i in range(2):
        for c in range(3):
            cos = float(emb[i] @ w[c]) / (emb[i].norm().item() * w[c].norm().item())
            expected[i, c] = 10.0 * (cos - (0.2 if c == labels[i] else 0.0))
    torch.testing.assert_close(head(emb, labels), expected, rtol=1e-5, atol=1e-5)
    no_margin = head(emb)
    torch.testing.assert_close(no_margin[0, 2] - expected[0, 2], torch.tensor(10.0 * 0.2), rtol=1e-5, atol=1e-5)


def test_aam_softmax_matches_hand_computation():
    torch.manual_seed(0)
    head = AAMSoftmax(4, 3, margin=0.3, scale=10.0)
    emb = torch.randn(4, 4)
    labels = torch.tensor([2, 0, 1, 1])
    with torch.no_grad():  # the last sample points away from class 1: theta + m > pi there
        head.weight[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        emb[3] = torch.tensor([-1.0, 0.05, 0.0, 0.0])
    w = head.weight.detach()
    expected, plain = torch.zeros(4, 3), torch.zeros(4, 3)
    for i in range(4):
        for c in range(3):
            cos = float(emb[i] @ w[c]) / (emb[i].norm().item() * w[c].norm().item())
            theta = math.acos(cos)
            plain[i, c] = 10.0 * cos
            if c != labels[i]:
                expected[i, c] = 10.0 * cos
            elif theta + 0.3 <= math.pi:
                expected[i, c] = 10.0 * math.cos(theta + 0.3)
            else:
                expected[i, c] = 10.0 * (cos - 0.3 * math.sin(0.3))
    assert math.acos(plain[3, 1].item() / 10.0) + 0.3 > math.pi, "the fallback branch is exercised"
    torch.testing.assert_close(head(emb, labels), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(head(emb), plain, rtol=1e-5, atol=1e-5)


def test_aam_softmax_matches_pytorch_metric_learning_arcface():
    torch.manual_seed(0)
    n_classes, dim, batch = 5, 16, 64
    for margin in (0.2, 0.5):
        head = AAMSoftmax(dim, n_classes, margin=margin, scale=30.0)
        arcface = ArcFaceLoss(n_classes, dim, margin=math.degrees(margin), scale=30.0)
        with torch.no_grad():
            arcface.W.copy_(head.weight.t())
        labels = torch.randint(0, n_classes, (batch,))
        emb = torch.randn(batch, dim)
        # Half the batch points almost exactly away from its class: theta + m > pi, the fallback branch.
        away = torch.arange(batch) % 2 == 0
        with torch.no_grad():
            emb[away] = -head.weight[labels[away]] + 0.05 * torch.randn(int(away.sum()), dim)
        cos_target = F.cosine_similarity(emb, head.weight[labels], dim=1)
        assert (cos_target < math.cos(math.pi - margin)).sum() >= 16 and (cos_target > 0).any()
        logits = head(emb, labels)
        # pytorch-metric-learning's logits, assembled from its own pieces as its compute_loss does.
        mask = arcface.get_target_mask(emb, labels)
        cosine = arcface.get_cosine(emb)
        target = cosine[mask == 1]
        theirs = arcface.scale_logits(
            cosine + mask * (arcface.modify_cosine_of_target_classes(target) - target)[:, None], emb
        )
        torch.testing.assert_close(logits, theirs.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(F.cross_entropy(logits, labels), arcface(emb, labels).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(emb), arcface.get_logits(emb).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["am_softmax", "aam_softmax"])
def test_set_margin_changes_only_the_target_logits(name):
    torch.manual_seed(0)
    head = build_head(name, 8, 4, margin=0.1, scale=30.0)
    assert HEADS[name].takes_margin
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    before = head(emb, labels)
    head.set_margin(0.4)
    after = head(emb, labels)
    target = F.one_hot(labels, 4).bool()
    assert (after[target] < before[target]).all(), "a larger margin lowers every target logit"
    torch.testing.assert_close(after[~target], before[~target])
    head.set_margin(0.0)
    torch.testing.assert_close(head(emb, labels), head(emb))


def test_aam_softmax_gradient_is_finite_at_the_class_centre():
    head = AAMSoftmax(4, 2, margin=0.2, scale=30.0)
    with torch.no_grad():
        head.weight[0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    emb = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)  # cos(theta) = 1 exactly
    F.cross_entropy(head(emb, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_softmax_head_uses_normalised_embeddings():
    head = SoftmaxHead(4, 3)
    emb = torch.randn(5, 4)
    torch.testing.assert_close(head(emb * 7.0), head(emb))


def test_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    labels = torch.tensor([0])
    eps = 0.2
    logp = F.log_softmax(logits, 1)[0]
    expected = -((1 - eps) * logp[0] + eps / 2 * logp[1] + eps / 2 * logp[2])
    torch.testing.assert_close(label_smoothing_ce(logits, labels, eps), expected)
    torch.testing.assert_close(label_smoothing_ce(logits, labels, 0.0), F.cross_entropy(logits, labels))


def test_pairs_are_all_unordered_pairs_with_balanced_weights():
    labels = torch.tensor([0, 0, 1, 1, 1])
    a, b, same = batch_pairs(labels)
    assert list(zip(a.tolist(), b.tolist())) == [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert same.sum() == 1 + 3
    w = pair_weights(same)
    torch.testing.assert_close(w[same].sum(), torch.tensor(0.5))
    torch.testing.assert_close(w[~same].sum(), torch.tensor(0.5))


def test_pair_loss_by_hand_without_smoothing():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    same = torch.tensor([True, False, False])
    p = torch.sigmoid(logits[0])
    expected = 0.5 * -math.log(p[0]) + 0.25 * -math.log(1 - p[1]) + 0.25 * -math.log(1 - p[2])
    torch.testing.assert_close(pair_loss(logits, same, 0.0), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    two_heads = torch.cat([logits, logits])
    torch.testing.assert_close(pair_loss(two_heads, same, 0.0), torch.tensor(2 * expected), rtol=1e-5, atol=1e-6)


def test_soft_targets_stay_in_their_bands():
    torch.manual_seed(0)
    from losses import soft_pair_targets

    same = torch.tensor([True] * 100 + [False] * 100)
    t = soft_pair_targets(same, 0.2)
    assert ((t[:100] >= 0.9) & (t[:100] <= 1.0)).all() and ((t[100:] >= 0) & (t[100:] <= 0.1)).all()
