"""x-vector style TDNN over MFCC frames (the seed's speech default, adapted from PASE's tdnn.py)."""

from torch import nn

from models import register_encoder
from models.base import Encoder
from models.pooling import StatsPool, as_frames, init_weights

# (kernel, padding, out_channels) of the frame-level layers; the output has frames - 4 steps.
FRAME_LAYERS = ((5, 2, 512), (5, 2, 512), (5, 3, 512), (7, 0, 512), (1, 0, 1500))
MIN_FRAMES = 5


def _bn_relu_linear(in_features, out_features):
    return nn.Sequential(nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU())


@register_encoder("TDNN", "speech")
class TDNN(Encoder):
    """(batch, ncoef, frames) or (batch, 1, ncoef, frames) -> (fc (batch, 512), mu (batch, latent_size)).

    Five Conv1d + BN + ReLU frame layers, mean || std pooling over time (3000), then `fc` =
    Linear(3000 -> 512) + BN + ReLU, the verification embedding, and `mu` = Linear(512 -> 512) + BN
    + ReLU + Linear(-> latent_size), the classification input. Inputs need at least 5 frames.
    """

    def __init__(self, ncoef=23, latent_size=256):
        super().__init__()
        layers, channels = [], ncoef
        for kernel, padding, out in FRAME_LAYERS:
            layers += [nn.Conv1d(channels, out, kernel, padding=padding, bias=False), nn.BatchNorm1d(out), nn.ReLU()]
            channels = out
        self.frames = nn.Sequential(*layers)
        self.pool = StatsPool()
        self.fc = _bn_relu_linear(2 * channels, 512)
        self.mu = nn.Sequential(_bn_relu_linear(512, 512), nn.Linear(512, latent_size))
        self.embedding_size = 512
        self.latent_size = latent_size
        self.min_frames = MIN_FRAMES  # scoring tiles shorter utterances up to this
        init_weights(self)

    def forward(self, x):
        x = as_frames(x)
        assert x.shape[-1] >= MIN_FRAMES, f"TDNN needs at least {MIN_FRAMES} frames, got {x.shape[-1]}"
        emb = self.fc(self.pool(self.frames(x)))
        return emb, self.mu(emb)
