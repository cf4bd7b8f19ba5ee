"""Losses recomputed by hand (pytorch-metric-learning's habit)."""

import math

import torch
import torch.nn.functional as F

from losses import AMSoftmax, SoftmaxHead, batch_pairs, label_smoothing_ce, pair_loss, pair_weights


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
