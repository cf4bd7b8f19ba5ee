"""Encoder registry and the full verification model.

A new encoder is one file here plus one `@register_encoder` line; scripts never branch on names.
Every module of this package is imported (found with pkgutil) the first time the registry is read,
so there is no list of modules to keep. Every encoder subclasses `models.base.Encoder` (its contract).
"""

import functools
import importlib
import pkgutil

from models.base import Encoder, contract_errors

ENCODERS = {}  # name -> (class or constructor function, domain)


def register_encoder(name, domain):
    """Decorator: make an encoder class (an `Encoder` subclass), or a function that builds one,
    constructible by `name` for `domain` ('image' or 'speech')."""

    def wrap(cls):
        assert name not in ENCODERS, f"encoder {name} registered twice"
        assert domain in ("image", "speech"), f"encoder {name}: unknown domain {domain!r}"
        if isinstance(cls, type) and not issubclass(cls, Encoder):
            raise TypeError(f"encoder {name}: {cls.__name__} must subclass models.base.Encoder")
        ENCODERS[name] = (cls, domain)
        return cls

    return wrap


@functools.cache
def _load_all():
    """Import every module of the package once, so their `@register_encoder` lines run."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def encoder_names(domain=None):
    """Registered encoder names, optionally only those of one domain."""
    _load_all()
    return sorted(n for n, (_, d) in ENCODERS.items() if domain is None or d == domain)


def encoder_domain(name):
    """'image' or 'speech' for a registered encoder name."""
    _load_all()
    return ENCODERS[name][1]


def create_encoder(name, **kwargs):
    """Build a registered encoder; its forward returns (embedding, classification_input) (see models.base)."""
    _load_all()
    if name not in ENCODERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(encoder_names())}")
    encoder = ENCODERS[name][0](**kwargs)
    errors = contract_errors(encoder)
    if errors:
        raise TypeError(f"encoder {name} breaks the Encoder contract: {'; '.join(errors)}")
    return encoder


from models.verifier import LearnedDistance, VerifierModel, build_model  # noqa: E402

__all__ = [
    "ENCODERS",
    "Encoder",
    "LearnedDistance",
    "VerifierModel",
    "build_model",
    "contract_errors",
    "create_encoder",
    "encoder_domain",
    "encoder_names",
    "register_encoder",
]
