"""Pre-activation ResNets over MFCC frames: the seed's resnet_stats, _mfcc, _lstm, _small and _large.

All five are registered. The seed's stem, Conv2d(1 -> 32, kernel (ncoef, 3), padding (0, 1)),
collapses the frequency axis to height 1, after which its 3x3 convolutions (padding 1) on a
height-1 map only ever use the middle row of their kernels. This module therefore builds the same
networks with 1-D convolutions over time: the stem is Conv1d(ncoef -> 32, k3, p1) and every 3x3 is
a k3. The functions computed are the seed's, without the two kernel rows it never used, so the
parameter counts are below the seed's (resnet_stats 18.0M here against its 25.8M at ncoef 30).

Stages of 64/128/256/512 planes with strides 1/2/2/2 (time downsampled 8x), no BN-ReLU after the
last stage (as the seed), then pooling over time and the shared tail: `fc` = ReLU(BN(Linear(pool
-> 512))), the verification embedding, and `mu` = Linear(512 -> latent_size), the classification
input. Self-attention pooling uses a proper attentive std (see models.pooling.AttentiveStatsPool).
"""

import torch
import torch.nn.functional as F
from torch import nn

from models import register_encoder
from models.base import Encoder
from models.pooling import AttentiveStatsPool, StatsPool, as_frames, init_weights

STEM_WIDTH = 32


class PreActBlock1d(nn.Module):
    """BN-ReLU-conv3(stride), BN-ReLU-conv3; a 1x1 projection of the activated input when the shape changes."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(in_planes)
        self.conv1 = nn.Conv1d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.conv2 = nn.Conv1d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActBottleneck1d(nn.Module):
    """BN-ReLU-conv1, BN-ReLU-conv3(stride), BN-ReLU-conv1 (x4 planes), with the same shortcut rule."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(in_planes)
        self.conv1 = nn.Conv1d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.conv2 = nn.Conv1d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(planes)
        self.conv3 = nn.Conv1d(planes, planes * self.expansion, 1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + skip


def _shortcut(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Conv1d(in_planes, out_planes, 1, stride=stride, bias=False)


class LSTMPool(nn.Module):
    """The seed's resnet_lstm pooling: a 2-layer BiLSTM (256 per direction, zero initial state) over time.

    (batch, channels, frames) -> attentive mean || std of its outputs (1024) concatenated with the
    mean of its four final hidden states (256): (batch, 1280).
    """

    def __init__(self, channels, hidden=256):
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.attention = AttentiveStatsPool(2 * hidden)
        self.out_features = 4 * hidden + hidden

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            out, (h_n, _) = self.lstm(x.float().transpose(1, 2))
        return torch.cat([self.attention(out.transpose(1, 2)), h_n.mean(dim=0)], dim=1)


class SpeechResNet(Encoder):
    """(batch, ncoef, frames) or (batch, 1, ncoef, frames) -> (fc (batch, 512), mu (batch, latent_size))."""

    def __init__(self, block, layers, pooling, ncoef=23, latent_size=256):
        super().__init__()
        self.stem = nn.Conv1d(ncoef, STEM_WIDTH, 3, padding=1, bias=False)
        stages, in_planes = [], STEM_WIDTH
        for planes, n_blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            for i in range(n_blocks):
                stages.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        if pooling == "stats":
            self.pool, pooled = StatsPool(), 2 * in_planes
        elif pooling == "attention":
            self.pool, pooled = AttentiveStatsPool(in_planes), 2 * in_planes
        else:
            assert pooling == "lstm", pooling
            self.pool = LSTMPool(in_planes)
            pooled = self.pool.out_features
        self.fc = nn.Sequential(nn.Linear(pooled, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU())
        self.mu = nn.Linear(512, latent_size)
        self.embedding_size = 512
        self.latent_size = latent_size
        init_weights(self)

    def forward(self, x):
        emb = self.fc(self.pool(self.stages(self.stem(as_frames(x)))))
        return emb, self.mu(emb)


# name -> (block, blocks per stage, pooling over time)
VARIANTS = {
    "resnet_stats": (PreActBottleneck1d, (3, 4, 6, 3), "stats"),
    "resnet_mfcc": (PreActBottleneck1d, (3, 4, 6, 3), "attention"),
    "resnet_lstm": (PreActBottleneck1d, (3, 4, 6, 3), "lstm"),
    "resnet_small": (PreActBlock1d, (2, 2, 2, 2), "attention"),
    "resnet_large": (PreActBottleneck1d, (3, 4, 23, 3), "attention"),
}


def _register(name, block, layers, pooling):
    def build(ncoef=23, latent_size=256):
        return SpeechResNet(block, layers, pooling, ncoef=ncoef, latent_size=latent_size)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: {block.__name__} {list(layers)}, {pooling} pooling; see SpeechResNet."
    register_encoder(name, "speech")(build)


for _name, (_block, _layers, _pooling) in VARIANTS.items():
    _register(_name, _block, _layers, _pooling)
