"""VGG-16 with batch norm for small images."""

import torch.nn.functional as F
from torch import nn

from models import register_encoder
from models.base import Encoder

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register_encoder("vgg", "image")
class VGG(Encoder):
    """VGG-16 (conv3x3-BN-ReLU stacks, max pools): (batch, C, H, W) -> 512-d embedding.

    Pools use ceil mode and the output is global-average pooled, so inputs from 8x8 to 84x84 work.
    """

    def __init__(self, in_channels=3, stem="cifar", cfg=VGG16):
        super().__init__()
        layers, channels = [], in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.embedding_size = self.latent_size = channels

    def forward(self, x):
        emb = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return emb, emb
