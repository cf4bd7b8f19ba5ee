"""Pre-activation ResNet-18 for images, with a CIFAR stem (32x32 and smaller) or an ImageNet-style stem (84x84)."""

import torch.nn.functional as F
from torch import nn

from models import register_encoder
from models.base import Encoder


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


def make_stem(stem, in_channels, width):
    """'cifar': conv3x3 + BN + ReLU. 'imagenet': conv5x5 (pad 1) + BN + ReLU + maxpool, for 84x84 inputs."""
    if stem == "cifar":
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    if stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    raise ValueError(f"unknown stem {stem!r}")


@register_encoder("resnet", "image")
class ResNet18(Encoder):
    """Pre-activation ResNet-18 [2,2,2,2]: (batch, C, H, W) -> 8*width-d embedding, global average pooled.

    `width` is the first stage's channels (64, the standard ResNet-18; smaller for quick CPU studies).
    `final_norm` adds the BN-ReLU after the last stage that standard pre-activation ResNets have (He et
    al. 2016); the research code's ResNet pools the last stage's un-normalised residual sum (off, default).
    """

    def __init__(self, in_channels=3, stem="cifar", blocks=(2, 2, 2, 2), width=64, final_norm=False):
        super().__init__()
        self.stem = make_stem(stem, in_channels, width)
        stages, in_planes = [], width
        for planes, n_blocks, stride in zip((width, 2 * width, 4 * width, 8 * width), blocks, (1, 2, 2, 2)):
            for i in range(n_blocks):
                stages.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU()) if final_norm else None
        self.embedding_size = self.latent_size = 8 * width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.stages(self.stem(x))
        if self.final is not None:
            out = self.final(out)
        emb = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return emb, emb
