"""ResNet34 over the (ncoef, frames) feature map as a one-channel image (the WeSpeaker / VoxCeleb recipe).

Conv2d(1 -> 32, 3x3, stride 1) + BN + ReLU, then basic blocks [3, 4, 6, 3] with 32/64/128/256 channels
and strides 1/2/2/2 on both axes (frequency and time reduced about 8x), statistics pooling over time of
the (channels x reduced frequency) map, mean || std, and a Linear to the embedding (256 by default).
With 80 coefficients the pooled vector is 2 * 256 * 10 = 5120 wide. Any input of one frame or more works.

Unlike the seed's resnet_* encoders (models/resnet_speech.py), the 3x3 convolutions here slide over
frequency as well as time. As every speech encoder here, it also returns a classification input,
`mu` = Linear(embedding_size -> latent_size), on which the run's softmax head sits.
"""

import torch.nn.functional as F
from torch import nn

from models import register_encoder
from models.base import Encoder
from models.pooling import StatsPool, as_frames, init_weights

STAGES = ((1, 3, 1), (2, 4, 2), (4, 6, 2), (8, 3, 2))  # (channels / base, blocks, stride) per stage


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU, conv3x3-BN, plus the input (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _reduced(size, stages=STAGES):
    """Length of an axis after the stage strides (3x3 convolutions, padding 1)."""
    for _, _, stride in stages:
        size = (size - 1) // stride + 1
    return size


@register_encoder("ResNet34", "speech")
class ResNet34(Encoder):
    """(batch, ncoef, frames) or (batch, 1, ncoef, frames) -> (embedding (batch, 256), mu (batch, latent_size))."""

    def __init__(self, ncoef=80, base_channels=32, embedding_size=256, latent_size=256):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, base_channels, 3, padding=1, bias=False), nn.BatchNorm2d(base_channels), nn.ReLU()
        )
        blocks, in_planes = [], base_channels
        for width, n_blocks, stride in STAGES:
            planes = width * base_channels
            for i in range(n_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*blocks)
        self.pool = StatsPool()
        self.fc = nn.Linear(2 * in_planes * _reduced(ncoef), embedding_size)
        self.mu = nn.Linear(embedding_size, latent_size)
        self.embedding_size = embedding_size
        self.latent_size = latent_size
        init_weights(self)

    def forward(self, x):
        x = self.stages(self.stem(as_frames(x).unsqueeze(1)))  # (batch, channels, ncoef / 8, frames / 8)
        emb = self.fc(self.pool(x.flatten(1, 2)))
        return emb, self.mu(emb)
