"""DenseNet-BC for small images (growth 12, blocks [6, 12, 24, 16], compression 0.5)."""

import torch
import torch.nn.functional as F
from torch import nn

from models import register_encoder
from models.base import Encoder
from models.resnet import make_stem


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4k) then BN-ReLU-conv3x3(k); the k new channels are concatenated to the input."""

    def __init__(self, in_planes, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to fewer channels, then 2x2 average pooling (ceil mode, so tiny maps survive)."""

    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2, ceil_mode=True)


@register_encoder("densenet", "image")
class DenseNet(Encoder):
    """DenseNet-BC (the seed's densenet_cifar): (batch, C, H, W) -> 384-d embedding."""

    def __init__(self, in_channels=3, stem="cifar", growth=12, blocks=(6, 12, 24, 16), reduction=0.5):
        super().__init__()
        planes = 2 * growth
        self.stem = make_stem(stem, in_channels, planes)
        layers = []
        for i, n_layers in enumerate(blocks):
            for _ in range(n_layers):
                layers.append(Bottleneck(planes, growth))
                planes += growth
            if i < len(blocks) - 1:
                out_planes = int(planes * reduction)
                layers.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(planes)
        self.embedding_size = self.latent_size = planes

    def forward(self, x):
        out = F.relu(self.bn(self.features(self.stem(x))))
        emb = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return emb, emb
