"""A trained model as two serving graphs: the encoder and the learned distance, traced to ONNX (and
optionally TorchScript), and checked against PyTorch with onnxruntime. export.py is the command line.

The graphs are traced through the model's own methods (VerifierModel.embed, LearnedDistance.forward and
.score), so they compute what eval.py computes.
"""

import inspect
import logging
import os
import re
import warnings

import numpy as np
import torch
from torch import nn

import models
from e2e_verification.tasks import task_for_model
from utils import UserError

OPSETS = {"torchscript": (14, 20, 17), "dynamo": (18, 23, 18)}  # exporter -> (lowest, highest, default)
EXAMPLE_FRAMES = 200  # trace length for speech; the graphs take any length (see MIN_FRAMES)
MIN_FRAMES = 8  # shortest input the exported speech graphs are declared for (TDNN needs 5)
STEM_SIZE = {"cifar": 32, "imagenet": 84}  # default image size per stem (data_load.image_stem)


class EncoderGraph(nn.Module):
    """The exported encoder: features -> model.embed(features), the verification embedding (batch, emb)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features):
        return self.model.embed(features)


class DistanceGraph(nn.Module):
    """The exported learned distance: (pairs, emb) x 2 -> (logit (pairs,), probability (pairs,)).

    `logit` is the mean over heads of `distance(enroll, test)`; `probability` is `distance.score`,
    the mean of the heads' sigmoid outputs (the e2e score; not the sigmoid of `logit` with several heads).
    """

    def __init__(self, distance):
        super().__init__()
        self.distance = distance

    def forward(self, enroll, test):
        return self.distance(enroll, test).mean(0), self.distance.score(enroll, test)


def encoder_arg(model, key):
    """An encoder argument of the checkpoint (`model_config['encoder_args']`), else its constructor's default."""
    args = model.config.get("encoder_args", {})
    if key in args:
        return args[key]
    models.encoder_names()  # loads the registry
    return inspect.signature(models.ENCODERS[model.config["model"]][0]).parameters[key].default


def recorded_image_size(model):
    """(height, width) of the images an image model was trained on, as its checkpoint records them
    (`model_config['image_input']`, see image_input.py), or None when it records none."""
    found = model.config.get("image_input") or {}
    size = found.get("height"), found.get("width")
    if all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        return size
    return None


def input_spec(model, image_size=None):
    """How the encoder is fed (its task decides): {'domain', 'shape' (with 'batch' / 'frames' for dynamic axes),
    'dynamic' ({axis: name}), 'notes', and 'ncoef' for speech, 'channels' and 'size' ([height, width]) for images}.

    An image model's size is `image_size` (height = width) when given, else the size its checkpoint records
    it was trained on, else the default of its stem (STEM_SIZE).
    """
    task = task_for_model(model.config["model"])
    recorded = recorded_image_size(model) if image_size is None and task.name == "image" else None
    side = recorded[0] if recorded else image_size
    spec = task.export_spec(lambda key: encoder_arg(model, key), side, STEM_SIZE, MIN_FRAMES)
    if recorded and recorded[1] != recorded[0]:
        spec = _with_width(spec, recorded[1])
    return spec


def _with_width(spec, width):
    """An image spec of height = width (the task's) changed to another width: size, shape and notes."""
    height, channels = spec["size"][0], spec["channels"]
    square, wide = f"(batch, {channels}, {height}, {height})", f"(batch, {channels}, {height}, {width})"
    assert square in spec["notes"], spec["notes"]
    return {**spec, "size": [height, width], "shape": [*spec["shape"][:-1], width],
            "notes": spec["notes"].replace(square, wide)}  # fmt: skip


def example_features(spec, batch=2, frames=EXAMPLE_FRAMES, device="cpu", seed=0):
    """A float32 batch of the spec's shape (the dynamic axes set to `batch` and `frames`)."""
    sizes = {"batch": batch, "frames": frames}
    shape = [sizes.get(dim, dim) for dim in spec["shape"]]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def export_graph(module, inputs, path, names, outputs, dynamic, opset, exporter):
    """torch.onnx.export `module` on example `inputs`; `dynamic` is {input name: {axis: axis name}}."""
    if exporter == "torchscript":
        axes = dict(dynamic)
        for out in outputs:
            axes[out] = {0: next(iter(dynamic.values()))[0]}
        kwargs = {"dynamo": False, "dynamic_axes": axes}
    else:
        dims = {}
        for axes in dynamic.values():
            for axis in axes.values():
                dims.setdefault(axis, torch.export.Dim(axis, min=MIN_FRAMES if axis == "frames" else 1))
        kwargs = {
            "dynamo": True,
            "external_data": False,
            "verbose": False,
            "dynamic_shapes": {n: {a: dims[x] for a, x in axes.items()} for n, axes in dynamic.items()},
        }
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # logs a traceback when a dynamo trace fails
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                module, tuple(inputs), path, input_names=names, output_names=outputs, opset_version=opset, **kwargs
            )
    finally:
        quiet.setLevel(level)


def cpu_session(path, threads=None):
    """An onnxruntime session of the graph file `path` on the CPU, its log quiet. `threads`: intra-op threads
    with one inter-op thread (as torch's default), or None for onnxruntime's own choice."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def parity(folder, encoder, distance, spec, device):
    """Max |onnxruntime - PyTorch| of both graphs on inputs unlike the trace's (batch 3, 137 frames; 5 pairs).

    Returns {'encoder', 'logit', 'probability': max abs difference, 'encoder_relative': the encoder's divided by
    the largest |embedding| (untrained deep models have large embeddings)}, or None without onnxruntime.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    open_graph = lambda name: cpu_session(os.path.join(folder, name))  # noqa: E731
    x = example_features(spec, batch=3, frames=137, device=device, seed=1)
    with torch.no_grad():
        emb = encoder(x)
        a, b = emb[[0, 0, 1, 2, 2]], emb[[1, 2, 2, 0, 1]]
        logit, prob = distance(a, b)
    got = open_graph("encoder.onnx").run(None, {"features": x.cpu().numpy()})[0]
    got_logit, got_prob = open_graph("distance.onnx").run(None, {"enroll": a.cpu().numpy(), "test": b.cpu().numpy()})
    diff = lambda out, ref: float(np.abs(out - ref.float().cpu().numpy()).max())  # noqa: E731
    scale = max(float(emb.abs().max()), 1e-30)
    return {
        "encoder": diff(got, emb),
        "encoder_relative": diff(got, emb) / scale,
        "logit": diff(got_logit, logit),
        "probability": diff(got_prob, prob),
    }


def graph_notes(spec, emb_size):
    """What each graph expects, in words (stored in export.json)."""
    features = spec["notes"]
    return {
        "encoder.onnx": f"features {features} Output embedding: float32 (batch, {emb_size}).",
        "distance.onnx": (
            f"enroll, test: float32 (pairs, {emb_size}) embeddings from encoder.onnx, pairs dynamic. Outputs "
            "logit (pairs,): the mean of the discriminator heads' logits; probability (pairs,): the mean of the "
            "heads' sigmoid outputs, the e2e score eval.py reports (higher means same class)."
        ),
    }


def export_model(model, folder, spec, opset, exporter, torchscript=False, device="cpu"):
    """Write encoder.onnx, distance.onnx (and encoder.pt, distance.pt) of `model` into the existing `folder`.

    Returns the parity record of `parity`.
    """
    encoder, distance = EncoderGraph(model).eval(), DistanceGraph(model.distance).eval()
    x = example_features(spec, device=device)
    try:
        with torch.no_grad():
            emb = encoder(x)
    except RuntimeError as err:  # e.g. an --image-size too small for the network's pooling
        raise UserError(f"{model.config['model']} cannot take input {tuple(x.shape)}: {root_cause(err)}") from None
    dynamic = {"features": spec["dynamic"]}
    export_graph(
        encoder, [x], os.path.join(folder, "encoder.onnx"), ["features"], ["embedding"], dynamic, opset, exporter
    )
    pair_axes = {"enroll": {0: "pairs"}, "test": {0: "pairs"}}
    export_graph(
        distance,
        [emb, emb.flip(0)],
        os.path.join(folder, "distance.onnx"),
        ["enroll", "test"],
        ["logit", "probability"],
        pair_axes,
        opset,
        exporter,
    )
    if torchscript:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # jit.trace's deprecation and tracer warnings
            torch.jit.trace(encoder, (x,)).save(os.path.join(folder, "encoder.pt"))
            torch.jit.trace(distance, (emb, emb.flip(0))).save(os.path.join(folder, "distance.pt"))
    return parity(folder, encoder, distance, spec, device)


def root_cause(err):
    """The first line of the innermost exception behind `err`, without terminal colour codes."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
