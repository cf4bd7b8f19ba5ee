"""ECAPA-TDNN (Desplanques, Thienpondt and Demuynck, Interspeech 2020) over MFCC or fbank frames.

Layout, (batch, ncoef, frames) throughout until the pooling; every convolution is "same"-padded, so
the frame count is kept and any input of one frame or more works:

- Conv1d(ncoef -> C, k5) + ReLU + BN.
- Three SE-Res2Blocks (k3, dilations 2, 3, 4), chained one after another as in the paper's figure 2:
  Conv1d 1x1 + ReLU + BN, a Res2Net convolution of scale 8, Conv1d 1x1 + ReLU + BN, squeeze-excitation
  (bottleneck 128), and the block's residual connection.
- Multi-layer feature aggregation: the three blocks' outputs concatenated (3C) -> Conv1d 1x1 + ReLU to
  `mfa_channels` = 1536, for C = 512 and C = 1024 alike, which is what the paper's parameter counts
  (6.2 M and 14.7 M) imply; some implementations widen it to 3C (3072 for C = 1024, about 20.8 M).
- Channel- and context-dependent attentive statistics pooling -> (batch, 2 * 1536), then BN.
- `fc` = Linear(3072 -> embedding_size) + BN: the verification embedding (192 by default).

As every speech encoder here, it also returns a classification input, `mu` = Linear(embedding_size ->
latent_size), on which the run's softmax head sits (the paper puts its AAM head on the embedding).
"""

import torch
from torch import nn

from models import register_encoder
from models.base import Encoder
from models.pooling import _weighted_stats, as_frames, init_weights
from utils import UserError


def _conv_relu_bn(in_channels, out_channels, kernel=1, dilation=1):
    """Conv1d ("same" padding) + ReLU + BN, the unit the paper builds everything from."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel, dilation=dilation, padding=padding),
        nn.ReLU(),
        nn.BatchNorm1d(out_channels),
    )


class Res2Conv(nn.Module):
    """Res2Net convolution: (batch, C, frames) -> (batch, C, frames) through `scale` channel groups.

    The first group passes unchanged; group i > 1 goes through its own Conv1d + ReLU + BN after the
    previous group's output is added to it, so later groups see ever larger receptive fields.
    """

    def __init__(self, channels, kernel, dilation, scale):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.convs = nn.ModuleList(_conv_relu_bn(width, width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x):
        groups = torch.chunk(x, self.scale, dim=1)
        outs, y = [groups[0]], None
        for group, conv in zip(groups[1:], self.convs):
            y = conv(group if y is None else group + y)
            outs.append(y)
        return torch.cat(outs, dim=1)


class SqueezeExcitation(nn.Module):
    """Rescale each channel of (batch, C, frames) by sigmoid(MLP(mean over time)), MLP C -> bottleneck -> C."""

    def __init__(self, channels, bottleneck):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv1d(channels, bottleneck, 1), nn.ReLU(), nn.Conv1d(bottleneck, channels, 1), nn.Sigmoid()
        )

    def forward(self, x):
        return x * self.gate(x.mean(dim=-1, keepdim=True))


class SERes2Block(nn.Module):
    """1x1 conv, Res2 conv (kernel, dilation), 1x1 conv, squeeze-excitation, plus the input: (batch, C, frames)."""

    def __init__(self, channels, kernel, dilation, scale, se_bottleneck):
        super().__init__()
        self.body = nn.Sequential(
            _conv_relu_bn(channels, channels),
            Res2Conv(channels, kernel, dilation, scale),
            _conv_relu_bn(channels, channels),
            SqueezeExcitation(channels, se_bottleneck),
        )

    def forward(self, x):
        return x + self.body(x)


class ContextAttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics: (batch, C, frames) -> (batch, 2 * C).

    Each frame is scored together with the utterance's global mean and std (context): the attention
    network sees [x_t; mean; std] (3C) -> Conv1d 1x1 (bottleneck) + ReLU + BN + tanh -> Conv1d 1x1 (C),
    and a softmax over time gives one weight per channel and frame. The output is the weighted mean
    || weighted std (models.pooling's statistics, computed in float32).
    """

    def __init__(self, channels, bottleneck=128):
        super().__init__()
        self.attention = nn.Sequential(
            _conv_relu_bn(3 * channels, bottleneck), nn.Tanh(), nn.Conv1d(bottleneck, channels, 1)
        )

    def forward(self, x):
        x = x.float()
        frames = x.shape[-1]
        mean, std = _weighted_stats(x).chunk(2, dim=1)
        context = torch.cat([x, mean.unsqueeze(-1).expand(-1, -1, frames), std.unsqueeze(-1).expand(-1, -1, frames)], 1)
        weights = torch.softmax(self.attention(context).float(), dim=-1)
        return _weighted_stats(x, weights)


@register_encoder("ECAPA_TDNN", "speech")
class ECAPA_TDNN(Encoder):  # noqa: N801 (the architecture's published name, also its --model name)
    """(batch, ncoef, frames) or (batch, 1, ncoef, frames) -> (embedding (batch, 192), mu (batch, latent_size)).

    `channels` is the paper's C (512 or 1024); frames >= 1. See the module docstring for the layout.
    """

    def __init__(
        self,
        ncoef=80,
        channels=512,
        embedding_size=192,
        latent_size=256,
        mfa_channels=1536,
        scale=8,
        se_bottleneck=128,
        attention_bottleneck=128,
    ):
        super().__init__()
        if channels % scale:
            raise UserError(f"ECAPA_TDNN channels must be a multiple of the Res2Net scale {scale}, got {channels}")
        self.front = _conv_relu_bn(ncoef, channels, kernel=5)
        self.blocks = nn.ModuleList(SERes2Block(channels, 3, d, scale, se_bottleneck) for d in (2, 3, 4))
        self.aggregate = nn.Sequential(nn.Conv1d(3 * channels, mfa_channels, 1), nn.ReLU())
        self.pool = ContextAttentiveStatsPool(mfa_channels, attention_bottleneck)
        self.pool_bn = nn.BatchNorm1d(2 * mfa_channels)
        self.fc = nn.Sequential(nn.Linear(2 * mfa_channels, embedding_size), nn.BatchNorm1d(embedding_size))
        self.mu = nn.Linear(embedding_size, latent_size)
        self.embedding_size = embedding_size
        self.latent_size = latent_size
        init_weights(self)

    def forward(self, x):
        x = self.front(as_frames(x))
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        pooled = self.pool_bn(self.pool(self.aggregate(torch.cat(outs, dim=1))))
        emb = self.fc(pooled)
        return emb, self.mu(emb)
