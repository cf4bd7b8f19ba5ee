"""Pooling over time for speech encoders, and the weight initialisation they share.

Both poolings turn frame features (batch, channels, frames) into one vector (batch, 2 * channels),
the mean and the standard deviation over time. They compute in float32 even under bf16 autocast,
since a variance of low-precision values loses most of its digits.
"""

import torch
from torch import nn

STD_EPS = 1e-5


def _weighted_stats(x, weights=None):
    """Mean and std over the last axis of (batch, channels, frames), optionally weighted by (batch, 1, frames)."""
    x = x.float()
    if weights is None:
        mean = x.mean(dim=-1)
        var = x.var(dim=-1, unbiased=False)
    else:
        mean = (weights * x).sum(dim=-1)
        var = (weights * (x - mean.unsqueeze(-1)).square()).sum(dim=-1)
    return torch.cat([mean, torch.sqrt(var + STD_EPS)], dim=1)


class StatsPool(nn.Module):
    """Mean || std over time: (batch, channels, frames) -> (batch, 2 * channels).

    The std carries a small epsilon under the square root (finite gradient for constant inputs);
    the seed added uniform noise to every frame instead, drawn on the CPU at every step.
    """

    def forward(self, x):
        return _weighted_stats(x)


class AttentiveStatsPool(nn.Module):
    """Self-attention pooling: (batch, channels, frames) -> weighted mean || weighted std (batch, 2 * channels).

    Frame weights are softmax_t(tanh(w . x_t)) with one learned vector w, as in the seed. The second
    half is the attentive standard deviation sqrt(sum_t a_t (x_t - mean)^2), the std of the frames
    under the attention weights; the seed instead took the plain std of the weighted frames a_t x_t,
    which mostly measures how uneven the weights are.
    """

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        nn.init.uniform_(self.weight, -(channels**-0.5), channels**-0.5)

    def forward(self, x):
        x = x.float()
        scores = torch.tanh(torch.einsum("bct,c->bt", x, self.weight.float()))
        weights = torch.softmax(scores, dim=-1).unsqueeze(1)
        return _weighted_stats(x, weights)


def init_weights(module):
    """He initialisation for convolutions and linear layers feeding ReLUs, unit BatchNorm, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def as_frames(x):
    """Accept (batch, ncoef, frames) or the seed's (batch, 1, ncoef, frames); return (batch, ncoef, frames)."""
    if x.dim() == 4:
        assert x.shape[1] == 1, f"expected one input channel, got shape {tuple(x.shape)}"
        x = x.squeeze(1)
    assert x.dim() == 3, f"expected (batch, ncoef, frames), got shape {tuple(x.shape)}"
    return x
