"""Checkpoints: atomic save, weights-only load, and rebuilding the model a checkpoint holds."""

import os
import pickle
import re

import torch

from utils import UserError, atomic_path

CHECKPOINT_FORMAT = 1


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically (temporary name in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with `weights_only=True`; anything else (a pickle payload) is refused."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (global|operand)[^.]*?([\w.]+) was not", str(err))
        what = f" ({found.group(2)})" if found else ""
        raise UserError(
            f"refusing to load {path}: it holds Python objects{what} besides tensors, and checkpoints are "
            "loaded weights only so that no code in them can run"
        ) from None
    except Exception:  # torch raises RuntimeError, EOFError, KeyError, ... on damaged files
        raise UserError(f"cannot read checkpoint {path}: truncated, damaged or not a PyTorch file") from None
    if not isinstance(state, dict) or "model_state" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a checkpoint written by this toolkit")
    return state


def strip_wrapper_prefixes(state_dict):
    """Weights saved from a DistributedDataParallel (`module.`) or compiled (`_orig_mod.`) model, as plain keys."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "module":
            parts = parts[1:]
        out[".".join(p for p in parts if p != "_orig_mod")] = value
    return out


def load_weights(model, state, path):
    """Put a checkpoint's weights into `model` (built from the same config); a mismatch is one UserError line."""
    if state["model_config"].get("model") != model.config["model"]:
        raise UserError(f"{path} holds a {state['model_config'].get('model')} model, not {model.config['model']}")
    try:
        model.load_state_dict(strip_wrapper_prefixes(state["model_state"]))
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the model built from these flags: {str(err).splitlines()[0]}") from None


def check_known_model(config, path):
    """Refuse a checkpoint whose encoder name is not registered (one UserError line)."""
    import models

    if config.get("model") not in models.encoder_names():
        raise UserError(f"{path} holds an unknown model {config.get('model')!r}")


def load_model_and_state(cp_path, model_name=None, device="cpu"):
    """(the Verifier a checkpoint holds, in eval mode on `device`; the checkpoint dict), one weights-only load.

    `model_name`, when given, must match the checkpoint's encoder (a check for the user's flags).
    """
    import models

    state = load_checkpoint(cp_path)
    config = state["model_config"]
    if model_name is not None and model_name != config["model"]:
        raise UserError(f"--model {model_name} does not match the checkpoint, which holds a {config['model']} model")
    check_known_model(config, cp_path)
    model = models.build_model(config)
    load_weights(model, state, cp_path)
    return model.to(device).eval(), state


def load_model(cp_path, model_name=None, device="cpu"):
    """The Verifier a checkpoint holds (weights-only load), in eval mode on `device` (see load_model_and_state)."""
    return load_model_and_state(cp_path, model_name, device)[0]
