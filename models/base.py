"""The encoder contract: what the VerifierModel, scoring, export and the training loop rely on.

An encoder is an `nn.Module` that subclasses `Encoder` and sets, in `__init__`:

- `embedding_size` (int): width of the verification embedding, the first output of `forward`; the
  learned distance and the cosine scorer read it.
- `latent_size` (int): width of the classification input, the second output; the softmax head sits on it.
- `min_frames` (int, speech encoders; class default 1): the fewest frames `forward` accepts; scoring
  tiles shorter utterances up to it.

`forward(x)` takes a batch, (batch, C, H, W) images or (batch, ncoef, frames) speech features (also
(batch, 1, ncoef, frames)), and returns `(embedding (batch, embedding_size), latent (batch, latent_size))`;
encoders whose classification input is the embedding return it twice. The contract adds no parameters
or buffers, so subclassing it leaves a model's `state_dict` keys (and old checkpoints) unchanged.

Constructor keywords the tasks pass (e2e_verification/tasks.py): image encoders `in_channels` and `stem`
('cifar' or 'imagenet'), speech encoders `ncoef` and `latent_size`; each with a default, since export and
the --pretrained-path check read the defaults from the registered constructor's signature.
"""

from torch import nn


class Encoder(nn.Module):
    """Base class of every registered encoder (see the module docstring for the contract)."""

    embedding_size: int
    latent_size: int
    min_frames: int = 1

    def forward(self, x):
        """Input batch -> (embedding (batch, embedding_size), latent (batch, latent_size))."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(x) -> (embedding, latent)")


def contract_errors(encoder):
    """What `encoder` (a built instance) lacks of the Encoder contract: a list of messages, empty if none."""
    errors = []
    if not isinstance(encoder, Encoder):
        errors.append(f"{type(encoder).__name__} does not subclass models.base.Encoder")
    if type(encoder).forward is Encoder.forward:
        errors.append(f"{type(encoder).__name__} does not define forward(x)")
    for name in ("embedding_size", "latent_size", "min_frames"):
        value = getattr(encoder, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(f"{type(encoder).__name__}.{name} must be an int >= 1, got {value!r}")
    return errors
