"""Encoder registry and the full verification model.

A new encoder is one file here plus one `@register_encoder` line; scripts never branch on names.
"""

import importlib

ENCODERS = {}
_MODULES = ("resnet", "vgg", "densenet", "tdnn", "resnet_speech", "ecapa_tdnn", "resnet34")


def register_encoder(name, domain):
    """Class decorator: make an encoder constructible by `name` for `domain` ('image' or 'speech')."""

    def wrap(cls):
        assert name not in ENCODERS, f"encoder {name} registered twice"
        ENCODERS[name] = (cls, domain)
        return cls

    return wrap


def _load_all():
    for module in _MODULES:
        try:
            importlib.import_module(f"models.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"models.{module}":
                raise


def encoder_names(domain=None):
    """Registered encoder names, optionally only those of one domain."""
    _load_all()
    return sorted(n for n, (_, d) in ENCODERS.items() if domain is None or d == domain)


def encoder_domain(name):
    """'image' or 'speech' for a registered encoder name."""
    _load_all()
    return ENCODERS[name][1]


def create_encoder(name, **kwargs):
    """Build a registered encoder; its forward returns (embedding, classification_input)."""
    _load_all()
    if name not in ENCODERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(encoder_names())}")
    return ENCODERS[name][0](**kwargs)


from models.verifier import LearnedDistance, Verifier, build_model  # noqa: E402

__all__ = [
    "ENCODERS",
    "LearnedDistance",
    "Verifier",
    "build_model",
    "create_encoder",
    "encoder_domain",
    "encoder_names",
    "register_encoder",
]
