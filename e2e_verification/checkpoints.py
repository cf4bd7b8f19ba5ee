"""Checkpoints: atomic save, weights-only load, and rebuilding the model a checkpoint holds."""

import hashlib
import os
import pickle
import re
import sys

import torch

from utils import UserError, atomic_path

CHECKPOINT_FORMAT = 1


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically (temporary name in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_weights_only(path, what, kind, map_location="cpu"):
    """torch.load(path, weights_only=True), the one way the toolkit reads a torch.save file (checkpoints, distance
    files): a file that does not start as torch.save's do (a zip archive or a pickle stream) is refused as not a
    `kind` before torch reads it, and one holding Python objects besides tensors is refused without running them.
    `what` names the file in the messages ("checkpoint")."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle stream
        found = "an empty file" if not head else "a file of another kind"
        raise UserError(f"{path} is not a {kind} ({found}; torch.save writes a zip archive)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (global|operand)[^.]*?([\w.]+) was not", str(err))
        name = f" ({found.group(2)})" if found else ""
        raise UserError(
            f"refusing to load {path}: it holds Python objects{name} besides tensors, and {what}s are "
            "loaded weights only so that no code in them can run"
        ) from None
    except Exception:  # torch raises RuntimeError, EOFError, KeyError, ... on damaged files
        raise UserError(f"cannot read {what} {path}: truncated, damaged or not a PyTorch file") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with `weights_only=True`; anything else (a pickle payload) is refused.

    A file that does not start as torch.save's files do (a zip archive or a pickle stream: a text file, an
    image, an empty file) is refused as not a checkpoint before torch reads it.
    """
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; give the checkpoint file (e.g. checkpoint_10ep.pt)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    state = load_weights_only(path, "checkpoint", "PyTorch checkpoint file", map_location)
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
    """(the VerifierModel a checkpoint holds, in eval mode on `device`; the checkpoint dict), one weights-only load.

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
    model.provenance = provenance_of(model, cp_path)
    model.calibration = state.get("calibration")  # fitted on the run's validation pairs, or None
    return model.to(device).eval(), state


def load_model(cp_path, model_name=None, device="cpu"):
    """The VerifierModel a checkpoint holds (weights-only load), in eval mode on `device` (see load_model_and_state)."""
    return load_model_and_state(cp_path, model_name, device)[0]


# ----------------------------------------------------------------------------- provenance
#
# Every artifact made from a model (score files, calibrations, cohort embeddings, PLDA models, distance
# back-ends, exports) records provenance_of(model): the checkpoint's path, a content hash of its weights and
# its front end. A command that uses such an artifact with a model calls check_provenance before any work.

ALLOW_OTHER_MODEL = "--allow-other-model"
ALLOW_OTHER_MODEL_HELP = (
    "use a calibration, cohort, PLDA, distance or score file that records another checkpoint than --cp-path"
)


def weights_digest(state_dict):
    """A content hash of weights: sha256 (first 16 hex digits) over every tensor's name, dtype, shape and bytes,
    in name order. The same weights give the same digest whatever file, device or wrapper they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(strip_wrapper_prefixes(state_dict).items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def provenance_of(model, cp_path=None):
    """What an artifact made with `model` records: {checkpoint, weights_sha256, model, front_end}."""
    config = getattr(model, "config", {}) or {}
    front_end = config.get("frontend") or config.get("image_input")
    return {
        "checkpoint": os.path.abspath(cp_path) if cp_path else None,
        "weights_sha256": weights_digest(model.state_dict()),
        "model": config.get("model"),
        "front_end": front_end,
    }


def model_provenance(model):
    """The provenance a loaded model carries (load_model_and_state sets it), else computed from its weights."""
    found = getattr(model, "provenance", None)
    return found if found is not None else provenance_of(model)


def check_provenance(recorded, model, what, allow=False):
    """Refuse (one UserError line) an artifact that records another model than `model`.

    `recorded` is the artifact's provenance dict (None when it records none: an older file or another
    toolkit's, which is used with a warning on stderr). With `allow` a mismatch is a warning instead.
    """
    mine = model_provenance(model)
    check_same_weights(recorded, mine, what, mine.get("checkpoint") or "this model", allow)


def check_same_weights(recorded, reference, what, reference_name, allow=False, override=ALLOW_OTHER_MODEL):
    """Refuse (one UserError line) `what`, whose provenance dict `recorded` names other weights than the
    provenance `reference` (a model's, or another artifact's: `reference_name` says which). Either recording
    none is a warning on stderr, and `what` is used as it is. With `allow` a mismatch is a warning too; the
    refusal names the flag `override` that allows it (None: no such flag)."""
    theirs, mine = (p.get("weights_sha256") if isinstance(p, dict) else None for p in (recorded, reference))
    if not theirs:
        print(f"warning: {what} does not record which model made it; it is used as it is", file=sys.stderr)
        return
    if not mine:
        print(f"warning: {reference_name} is not recorded, so {what} is not checked against it", file=sys.stderr)
        return
    if theirs == mine:
        return
    message = (
        f"{what} was made with {recorded.get('checkpoint') or 'another checkpoint'} (weights {theirs}), not with "
        f"{reference_name} (weights {mine})"
    )
    if allow:
        print(f"warning: {message}; used anyway ({override})", file=sys.stderr)
        return
    raise UserError(f"{message}; give {override} to use it anyway" if override else message)
