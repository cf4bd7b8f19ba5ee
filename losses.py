"""Classification heads, label smoothing and the pair loss of the learned distance.

Two registries, each one name -> one object, and nothing else to edit:

- `HEADS` (--softmax): a head class with `__init__(in_features, n_classes, margin=, scale=)` when its
  class attribute `takes_margin` is true, else `__init__(in_features, n_classes, scale=)`;
  `forward(embeddings (batch, in_features), labels (batch,) or None) -> logits (batch, n_classes)`
  (labels=None: inference, no margin); class attribute `hp_search`: whether hp_space's searches try it.
- `PAIR_LOSSES`: the objective of the learned distance, `fn(logits (n_heads, pairs), same (pairs,)
  bool, smoothing float) -> scalar loss`; the training loop calls `PAIR_LOSSES[DEFAULT_PAIR_LOSS]`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module):
    """What the margin heads share: class weights (n_classes, in_features), a margin and a scale."""

    takes_margin = True  # built with the run's --margin and --scale (see build_head)
    hp_search = False  # tried by the hyperparameter searches (hp_space)

    def __init__(self, in_features, n_classes, margin, scale):
        super().__init__()
        self.margin = margin
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.kaiming_normal_(self.weight)

    def set_margin(self, value):
        """Change the margin m (the training loop's margin schedule calls this each epoch)."""
        self.margin = float(value)


class AMSoftmax(MarginHead):
    """Additive-margin softmax head (CosFace): logits `s * (cos(theta) - m * onehot(label))`.

    Embeddings and class weights are both L2-normalised, so cos(theta) is their dot product.
    Defaults follow the seed code (m=0.35, s=30). With `labels=None` the margin is left out
    (plain scaled cosines), which is what inference and accuracy want.
    """

    hp_search = True  # one of the seed search's two heads

    def __init__(self, in_features, n_classes, margin=0.35, scale=30.0):
        super().__init__(in_features, n_classes, margin, scale)

    def forward(self, embeddings, labels=None):
        """(batch, in_features), (batch,) -> logits (batch, n_classes)."""
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        cos = cos.clamp(-1.0, 1.0)
        if labels is not None:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * cos


class AAMSoftmax(MarginHead):
    """Additive angular margin softmax head (ArcFace): `s * cos(theta + m)` for the label, `s * cos(theta)` elsewhere.

    theta is the angle between the L2-normalised embedding and class weight. Where theta + m would
    pass pi, cos(theta + m) stops decreasing in theta; there (cos(theta) <= cos(pi - m)) the target
    logit is `s * (cos(theta) - m * sin(m))` instead, the fallback of the common implementations
    (InsightFace's `easy_margin=False`, pytorch-metric-learning's ArcFaceLoss). With `labels=None` the
    margin is left out (plain scaled cosines), as in AMSoftmax. The margin arithmetic runs in float32.
    """

    def __init__(self, in_features, n_classes, margin=0.2, scale=30.0):
        super().__init__(in_features, n_classes, float(margin), scale)  # margin in radians

    def forward(self, embeddings, labels=None):
        """(batch, in_features), (batch,) -> logits (batch, n_classes)."""
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        cos = cos.float().clamp(-1.0, 1.0)
        if labels is None:
            return self.scale * cos
        target = cos.gather(1, labels.unsqueeze(1))
        # sin(theta) >= 0 for theta in [0, pi]. The root's gradient grows as 1 / sin(theta); the floor bounds it
        # near |cos| = 1 (the clamp above already stops the gradient at exactly 1).
        sin = (1.0 - target.square()).clamp(min=1e-7).sqrt()
        m = self.margin
        shifted = torch.where(
            target > math.cos(math.pi - m),
            target * math.cos(m) - sin * math.sin(m),
            target - m * math.sin(m),
        )
        return self.scale * cos.scatter(1, labels.unsqueeze(1), shifted)


class SoftmaxHead(nn.Module):
    """Plain softmax head: a linear layer (with bias) on the L2-normalised embedding times `scale`.

    scale 1 is the seed's head: its logits are bounded by the weight norms (about sqrt(2) at kaiming
    init, held down by weight decay), so the cross-entropy can hardly fall below log(K) and learns
    slowly; a scale such as 30 (the AM-softmax scale) lifts the bound.
    """

    takes_margin = False
    hp_search = True  # one of the seed search's two heads

    def __init__(self, in_features, n_classes, scale=1.0):
        super().__init__()
        self.scale = float(scale)
        self.linear = nn.Linear(in_features, n_classes)
        nn.init.kaiming_normal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, embeddings, labels=None):
        """(batch, in_features) -> logits (batch, n_classes); labels are not used."""
        return self.linear(self.scale * F.normalize(embeddings, dim=1))


# The classification heads by --softmax name: a new head is one class (with `takes_margin` and
# `hp_search`) and one entry, appended (the order is that of --softmax's choices in --help).
HEADS = {"am_softmax": AMSoftmax, "aam_softmax": AAMSoftmax, "softmax": SoftmaxHead}


def build_head(name, in_features, n_classes, margin=0.35, scale=30.0, softmax_scale=1.0):
    """The classification head registered as `name`; margin heads get `margin` and `scale`, the plain
    softmax head `softmax_scale` (1: the seed's unscaled head)."""
    cls = HEADS[name]
    if cls.takes_margin:
        return cls(in_features, n_classes, margin=margin, scale=scale)
    return cls(in_features, n_classes, scale=softmax_scale)


def label_smoothing_ce(logits, labels, smoothing):
    """Cross-entropy against a smoothed target: 1-eps on the true class, eps/(K-1) on each other class.

    This is the seed's definition (torch's `label_smoothing` spreads eps over all K classes instead).
    """
    if smoothing <= 0:
        return F.cross_entropy(logits, labels)
    n_classes = logits.shape[1]
    log_probs = F.log_softmax(logits, dim=1)
    target = torch.full_like(log_probs, smoothing / max(n_classes - 1, 1))
    target.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing)
    return -(target * log_probs).sum(dim=1).mean()


def batch_pairs(labels):
    """All unordered pairs (i < j) of a batch and whether each shares a class.

    labels: (batch,) -> idx_a (pairs,), idx_b (pairs,), same (pairs,) bool.
    """
    idx_a, idx_b = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    return idx_a, idx_b, labels[idx_a] == labels[idx_b]


def pair_weights(same):
    """Per-pair weights that give positives and negatives half of the loss each.

    The seed repeated every positive pair once per negative (all triplets) to reach 50/50; weighting
    each unique pair gives the same balance without the repetition. If a batch holds only one kind
    of pair, that kind carries the whole weight.
    """
    n_pos = same.sum()
    n_neg = same.numel() - n_pos
    pos_w = 0.5 / n_pos if n_pos > 0 else 0.0
    neg_w = 0.5 / n_neg if n_neg > 0 else 0.0
    weights = torch.where(same, pos_w, neg_w).to(torch.float32)
    return weights / weights.sum()


def soft_pair_targets(same, smoothing):
    """Noisy soft targets of the seed: positives ~ U(1-d, 1), negatives ~ U(0, d), with d = smoothing/2."""
    target = same.to(torch.float32)
    delta = smoothing / 2.0
    if delta <= 0:
        return target
    noise = torch.rand(same.shape, device=same.device) * delta
    return torch.where(same, 1.0 - noise, noise)


def pair_loss(logits, same, smoothing=0.0):
    """Binary cross-entropy of the learned distance, balanced between positive and negative pairs.

    logits: (n_heads, pairs) raw discriminator outputs; same: (pairs,) bool. Returns the sum over
    heads (each head is trained on its own BCE, as in the seed).
    """
    weights = pair_weights(same)
    targets = soft_pair_targets(same, smoothing)
    total = logits.new_zeros(())
    for head_logits in logits:
        bce = F.binary_cross_entropy_with_logits(head_logits.float(), targets, reduction="none")
        total = total + (bce * weights).sum()
    return total


# The pair objectives of the learned distance by name: a new one is one function (pair_loss's signature) and
# one entry. DEFAULT_PAIR_LOSS is the one the training loop uses.
PAIR_LOSSES = {"bce": pair_loss}
DEFAULT_PAIR_LOSS = "bce"
