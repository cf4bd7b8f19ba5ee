"""Checkpoint averaging: the mean of the weights of N checkpoints of one model (as WeSpeaker's average_model).

Averaging the last epochs' weights smooths out the noise of the final steps of SGD and usually lowers the EER a
little; it is the field's step between training and extracting embeddings. Floating-point tensors are averaged
in float64 and cast back to their dtype; integer (and bool) tensors, such as BatchNorm's num_batches_tracked,
take the value of the last checkpoint (the highest epoch with --last). The result is a checkpoint that eval.py,
embed.py, export.py and verify.py load as a training checkpoint; it holds no optimizer or scheduler state, so
training cannot be resumed from it (it can be fine-tuned from with --pretrained-path).
"""

import os
import re

import torch

from e2e_verification.checkpoints import (
    CHECKPOINT_FORMAT,
    check_known_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    strip_wrapper_prefixes,
    weights_digest,
)
from utils import UserError, same_path

EPOCH_FILE = re.compile(r"^checkpoint_(\d+)ep\.pt$")  # the name TrainLoop.checkpoint_file gives epoch k


def epoch_checkpoints(folder):
    """[(epoch, path)] of the checkpoint_<k>ep.pt files train.py wrote into `folder`, by epoch."""
    if not os.path.isdir(folder):
        raise UserError(f"--checkpoint-path {folder} is not a folder")
    found = [
        (int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := EPOCH_FILE.match(name))
    ]
    return sorted(found)


def last_checkpoints(folder, n):
    """The paths of the `n` highest-epoch checkpoints in `folder`, lowest epoch first."""
    if n < 1:
        raise UserError(f"--last must be at least 1, got {n}")
    found = epoch_checkpoints(folder)
    if not found:
        raise UserError(f"--checkpoint-path {folder} holds no checkpoint_<k>ep.pt files")
    if n > len(found):
        epochs = ", ".join(str(e) for e, _ in found)
        raise UserError(f"--last {n}, but {folder} holds only {len(found)} epoch checkpoints (epochs {epochs})")
    return [path for _, path in found[-n:]]


def check_distinct(paths):
    """Refuse a checkpoint given twice (it would weigh double in the mean)."""
    for i, path in enumerate(paths):
        for other in paths[:i]:
            if same_path(path, other):
                raise UserError(f"{path} is given twice (also as {other}); each checkpoint is averaged once")


def read_weights(path):
    """(the checkpoint dict, its weights {name: tensor} with plain names) of `path`, every weight a finite tensor."""
    state = load_checkpoint(path)
    weights = state["model_state"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{path} is not a checkpoint written by this toolkit (its model_state is not all tensors)")
    weights = strip_wrapper_prefixes(weights)
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path} holds non-finite weights (NaN or infinite) in {name}; it cannot be averaged")
    return state, weights


def config_difference(a, b, where="model_config"):
    """The first place (a dotted key) where model configs `a` and `b` differ, as "key: A vs B"; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = config_difference(a.get(key, "(absent)"), b.get(key, "(absent)"), f"{where}.{key}")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def _dtype(tensor):
    return str(tensor.dtype).replace("torch.", "")


def weights_difference(a, b):
    """The first difference between weight dicts `a` and `b` (names, shapes, dtypes) as "what: A vs B"; None if none."""
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            return f"weight {name}: {'present' if name in a else 'absent'} vs {'present' if name in b else 'absent'}"
        if a[name].shape != b[name].shape:
            return f"shape of {name}: {tuple(a[name].shape)} vs {tuple(b[name].shape)}"
        if a[name].dtype != b[name].dtype:
            return f"dtype of {name}: {_dtype(a[name])} vs {_dtype(b[name])}"
    return None


def check_same_model(first_path, first, ref, path, state, weights):
    """Refuse (one UserError line) checkpoint `path` when it holds another model than `first_path`."""
    found = config_difference(first["model_config"], state["model_config"]) or weights_difference(ref, weights)
    if found:
        raise UserError(f"{first_path} and {path} are checkpoints of different models: {found}")


def input_record(path, state, model):
    """What the average records of one input (`model` holds its weights): path, epoch, weights digest."""
    digest = weights_digest(model.state_dict())  # as checkpoints.provenance_of gives it for this file
    return {"checkpoint": os.path.abspath(path), "epoch": state.get("epoch"), "weights_sha256": digest}


def mean_weights(paths):
    """(the mean weights of checkpoints `paths`, the last checkpoint dict, the model holding the mean, a record
    per input), reading one file at a time; every input is checked (readable, the first one's model, finite)."""
    import models

    first, ref = read_weights(paths[0])
    check_known_model(first["model_config"], paths[0])
    model = models.build_model(first["model_config"])
    sums, records = {}, []
    for i, path in enumerate(paths):
        state, weights = (first, ref) if i == 0 else read_weights(path)
        check_same_model(paths[0], first, ref, path, state, weights)
        load_weights(model, {**state, "model_state": weights}, path)
        records.append(input_record(path, state, model))
        for name, tensor in weights.items():
            if tensor.is_floating_point():
                sums[name] = sums[name] + tensor.double() if name in sums else tensor.double()
    # integer and bool tensors (num_batches_tracked) keep the last checkpoint's value
    mean = {name: (sums[name] / len(paths)).to(ref[name].dtype) if name in sums else weights[name] for name in ref}
    load_weights(model, {**state, "model_state": mean}, "the average")
    return mean, state, model, records


def average(paths):
    """The averaged checkpoint dict of `paths` (one model; see the module doc): the last input's config, epoch,
    history and training arguments, no optimizer or scheduler state, and which checkpoints made it."""
    if not paths:
        raise UserError("no checkpoints to average: give --checkpoint-path DIR --last N, or checkpoint files")
    check_distinct(paths)
    mean, last, model, records = mean_weights(paths)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": last["model_config"],
        "model_state": mean,
        "epoch": last.get("epoch"),  # the last input's, as export.py records it
        "history": last.get("history", {}),
        "args": last.get("args", {}),  # the training arguments (image_input reads them for old checkpoints)
        "averaged": {
            "checkpoints": records,
            "integer_tensors": "last",
            "weights_sha256": weights_digest(model.state_dict()),
        },
    }


def write_average(paths, out):
    """Average checkpoints `paths` and save the result to `out` atomically; returns the saved dict."""
    state = average(paths)
    save_checkpoint(out, state)
    return state
