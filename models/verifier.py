"""The verification model: an encoder, a classification head and the learned distance."""

import torch
import torch.nn.functional as F
from torch import nn

from losses import HEADS, AMSoftmax, batch_pairs


class DistanceHead(nn.Module):
    """One discriminator MLP on a pair of embeddings; returns a logit (same class vs not).

    Layout (seed): optional random projection of the concatenated pair [a; b] to `rproj_size`,
    Linear -> LeakyReLU(0.1), (n_hidden - 1) x [Linear -> LeakyReLU(0.1)], Dropout, Linear(-> 1).
    The projection is a fixed buffer unless `trainable_rproj` (what the seed code really did,
    through a `require_grad` typo).
    """

    def __init__(self, emb_size, hidden_size, n_hidden, dropout_prob, rproj_size=0, trainable_rproj=False):
        super().__init__()
        self.emb_size = emb_size
        in_features = 2 * emb_size
        if rproj_size > 0:
            proj = torch.randn(rproj_size, in_features)
            proj = proj / proj.norm()
            if trainable_rproj:
                self.proj = nn.Parameter(proj)
            else:
                self.register_buffer("proj", proj)
            in_features = rproj_size
        else:
            self.proj = None
        self.first = nn.Linear(in_features, hidden_size)
        layers = []
        for _ in range(n_hidden - 1):
            layers += [nn.Linear(hidden_size, hidden_size), nn.LeakyReLU(0.1, inplace=True)]
        layers += [nn.Dropout(dropout_prob), nn.Linear(hidden_size, 1)]
        self.rest = nn.Sequential(*layers)

    def forward(self, a, b):
        """(pairs, emb), (pairs, emb) -> logits (pairs,), from the concatenated pair."""
        pair = torch.cat([a, b], dim=1)
        if self.proj is not None:
            pair = pair @ self.proj.t()
        return self.tail(self.first(pair))

    def split_first_layer(self, emb):
        """Project every embedding once through each half of the first layer.

        (n, emb) -> (n, hidden) for the left slot (bias included) and for the right slot, so that
        `first([a; b]) == left[a] + right[b]` and a pair costs one addition instead of a matmul.
        """
        weight = self.first.weight
        if self.proj is not None:
            weight = weight @ self.proj
        left = F.linear(emb, weight[:, : self.emb_size], self.first.bias)
        right = F.linear(emb, weight[:, self.emb_size :])
        return left, right

    def tail(self, hidden):
        """Everything after the first linear layer: (..., hidden) -> logits (...).

        `hidden` is overwritten (activations run in place: all-pairs scoring holds large blocks).
        """
        return self.rest(F.leaky_relu(hidden, 0.1, inplace=True)).squeeze(-1)


class LearnedDistance(nn.Module):
    """An ensemble of `ndiscriminators` DistanceHeads; scores are the mean sigmoid output."""

    def __init__(
        self,
        emb_size,
        hidden_size=512,
        n_hidden=1,
        dropout_prob=0.25,
        ndiscriminators=1,
        rproj_size=0,
        trainable_rproj=False,
    ):
        super().__init__()
        self.heads = nn.ModuleList(
            DistanceHead(emb_size, hidden_size, n_hidden, dropout_prob, rproj_size, trainable_rproj)
            for _ in range(ndiscriminators)
        )

    def forward(self, a, b):
        """(pairs, emb) x 2 -> logits (n_heads, pairs)."""
        return torch.stack([head(a, b) for head in self.heads])

    def pair_logits(self, emb, idx_a, idx_b):
        """Logits (n_heads, pairs) of the pairs (emb[idx_a], emb[idx_b]), through the split first layer."""
        outs = []
        for head in self.heads:
            left, right = head.split_first_layer(emb)
            outs.append(head.tail(left[idx_a] + right[idx_b]))
        return torch.stack(outs)

    def score(self, a, b):
        """(pairs, emb) x 2 -> probability of same class (pairs,), averaged over heads."""
        return torch.sigmoid(self.forward(a, b)).mean(0)


class Verifier(nn.Module):
    """Encoder + classification head + learned distance, rebuilt from `config` alone.

    `config` keys: model, encoder_args (dict), n_classes, softmax, margin, scale, hidden_size,
    n_hidden, dropout_prob, ndiscriminators, rproj_size, trainable_rproj.
    """

    def __init__(self, config):
        super().__init__()
        from models import create_encoder

        self.config = dict(config)
        self.encoder = create_encoder(config["model"], **config.get("encoder_args", {}))
        cls_size = self.encoder.latent_size
        if config["softmax"] == "am_softmax":
            self.classifier = AMSoftmax(cls_size, config["n_classes"], config["margin"], config["scale"])
        else:
            self.classifier = HEADS[config["softmax"]](cls_size, config["n_classes"])
        self.distance = LearnedDistance(
            self.encoder.embedding_size,
            config["hidden_size"],
            config["n_hidden"],
            config["dropout_prob"],
            config["ndiscriminators"],
            config["rproj_size"],
            config.get("trainable_rproj", False),
        )

    def forward(self, x, labels=None):
        """Input batch -> (embedding (batch, emb), classification input (batch, latent)).

        With `labels` (training) it returns what the losses need instead: classification logits
        (batch, n_classes), pair logits (n_heads, pairs) for all i < j pairs, and their same-class flags.
        """
        emb, latent = self.encoder(x)
        if labels is None:
            return emb, latent
        logits = self.classifier(latent, labels)
        idx_a, idx_b, same = batch_pairs(labels)
        return logits, self.distance.pair_logits(emb, idx_a, idx_b), same

    def embed(self, x):
        """Input batch -> verification embedding (batch, emb)."""
        return self.encoder(x)[0]


def build_model(config):
    """The Verifier described by a checkpoint's `model_config`."""
    return Verifier(config)
