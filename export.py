"""Export a trained checkpoint to ONNX: the encoder and the learned distance as two graphs, for serving.

Writes, atomically, into the folder --out (refused if it exists, unless --force):
  encoder.onnx   input `features`, float32: speech (batch, ncoef, frames) with batch and frames dynamic,
                 images (batch, channels, size, size) with batch dynamic; output `embedding` (batch, emb)
  distance.onnx  inputs `enroll`, `test`, float32 (pairs, emb) with pairs dynamic; outputs `logit` (pairs,),
                 the mean of the heads' logits, and `probability` (pairs,), the mean of their sigmoids
                 (the e2e score of eval.py)
  export.json    model name, input layout, embedding size, opset, exporter, the checkpoint's model_config,
                 what each graph expects, and the parity of the graphs against PyTorch (when onnxruntime is here)
  encoder.pt, distance.pt   with --torchscript: the same two modules traced with torch.jit.trace

The graphs are traced through the model's own methods (Verifier.embed, LearnedDistance.forward and
.score), so they compute what eval.py computes. The default exporter is the TorchScript one
(`dynamo=False`): it exports every registered encoder with dynamic axes, including resnet_lstm,
which the torch.export-based exporter (--exporter dynamo) cannot trace with a dynamic time axis.
"""

import argparse
import contextlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

import models
from checkpoints import load_model_and_state
from tasks import task_for_model
from utils import ArgumentParser, UserError, add_device_flags, cli, device_from_args, write_json

EXAMPLE = """example:
  python export.py --cp-path cp/checkpoint_10ep.pt --out exp/onnx/
  python export.py --cp-path cp/checkpoint_10ep.pt --out exp/onnx/ --torchscript --force"""
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


def build_parser():
    p = ArgumentParser(description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--out", required=True, help="output folder; must not exist (its parent must)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 18 with --exporter dynamo)")
    p.add_argument(
        "--exporter",
        choices=sorted(OPSETS),
        default="torchscript",
        help="torch.onnx exporter: torchscript (dynamo=False, every encoder) or dynamo (default torchscript)",
    )
    p.add_argument("--torchscript", action="store_true", help="also write encoder.pt / distance.pt (jit.trace)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image models: input height = width in pixels (default 32, or 84 for the imagenet stem)",
    )
    add_device_flags(p)
    p.set_defaults(device="cpu")
    return p


def encoder_arg(model, key):
    """An encoder argument of the checkpoint (`model_config['encoder_args']`), else its constructor's default."""
    args = model.config.get("encoder_args", {})
    if key in args:
        return args[key]
    models.encoder_names()  # loads the registry
    return inspect.signature(models.ENCODERS[model.config["model"]][0]).parameters[key].default


def input_spec(model, image_size=None):
    """How the encoder is fed (its task decides): {'domain', 'shape' (with 'batch' / 'frames' for dynamic axes),
    'dynamic' ({axis: name}), 'notes', and 'ncoef' for speech, 'channels' and 'size' for images}."""
    task = task_for_model(model.config["model"])
    return task.export_spec(lambda key: encoder_arg(model, key), image_size, STEM_SIZE, MIN_FRAMES)


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


def parity(folder, encoder, distance, spec, device):
    """Max |onnxruntime - PyTorch| of both graphs on inputs unlike the trace's (batch 3, 137 frames; 5 pairs).

    Returns {'encoder', 'logit', 'probability': max abs difference, 'encoder_relative': the encoder's divided by
    the largest |embedding| (untrained deep models have large embeddings)}, or None without onnxruntime.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    open_graph = lambda name: ort.InferenceSession(  # noqa: E731
        os.path.join(folder, name), options, providers=["CPUExecutionProvider"]
    )
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


def check_output(out, force):
    """The absolute --out path, if it can be written: its parent exists, and it does not (with `force`: it is
    empty or an earlier export, so that a mistyped --out never deletes other files)."""
    path = os.path.abspath(out)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UserError(f"parent folder of --out does not exist: {parent}")
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise UserError(f"--out {out} exists and is not a folder")
        if not force:
            raise UserError(f"output folder {out} already exists (pass --force to replace it)")
        if os.listdir(path) and not os.path.isfile(os.path.join(path, "export.json")):
            raise UserError(f"--force replaces only an earlier export (a folder with export.json); {out} is not one")
    return path


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a fresh temporary folder beside `path`; on success it replaces `path`, on failure it is deleted."""
    parent, name = os.path.split(path)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old, name))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None):
    args = build_parser().parse_args(argv)
    low, high, default = OPSETS[args.exporter]
    opset = default if args.opset is None else args.opset
    if not low <= opset <= high:
        raise UserError(f"--opset {opset} is outside what the {args.exporter} exporter writes here ({low}..{high})")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be >= 1, got {args.image_size}")
    if args.amp:
        raise UserError("--amp does not apply to export: the graphs are float32")
    out = check_output(args.out, args.force)
    device = device_from_args(args)
    model, state = load_model_and_state(args.cp_path, None, device)
    spec = input_spec(model, args.image_size)
    name, emb_size = model.config["model"], model.encoder.embedding_size
    print(
        f"exporting {name} ({spec['domain']}, input {spec['shape']}, embedding {emb_size}) with the "
        f"{args.exporter} exporter, opset {opset}",
        flush=True,
    )
    with atomic_folder(out) as tmp:
        try:
            checks = export_model(model, tmp, spec, opset, args.exporter, args.torchscript, device)
        except Exception as err:
            if args.exporter == "torchscript":
                raise
            raise UserError(
                f"the dynamo exporter cannot export {name} ({root_cause(err)}); try --exporter torchscript"
            ) from None
        info = {
            "model": name,
            "input": spec,
            "embedding_size": emb_size,
            "opset": opset,
            "exporter": args.exporter,
            "torch_version": torch.__version__,
            "checkpoint": {"path": os.path.abspath(args.cp_path), "epoch": state.get("epoch")},
            "model_config": model.config,
            "graphs": graph_notes(spec, emb_size),
            "parity_max_abs_diff": checks,
            "torchscript": ["encoder.pt", "distance.pt"] if args.torchscript else [],
        }
        write_json(os.path.join(tmp, "export.json"), info)
    if checks is None:
        print("onnxruntime is not installed: the graphs were not checked against PyTorch")
    else:
        print("max |onnxruntime - PyTorch|: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli(main)
