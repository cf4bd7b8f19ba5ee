"""Embedding speed of the exported encoder: onnxruntime (CPU) against the PyTorch model it was exported from.

For each encoder (default a TDNN on batches of 32 x 30 coefficients x 300 frames, and the image
ResNet-18 on batches of 64 x 3 x 32 x 32), a randomly initialised model is exported with export.py's
own code to a temporary folder, then the same batch is embedded by PyTorch (eval mode, no_grad) and
by an onnxruntime session with the same number of threads. Prints the parity of the two outputs and
the time ratio (PyTorch time over onnxruntime time: above 1 means onnxruntime is faster).
"""

import os
import tempfile

import benchlib
import numpy as np
import torch
from benchlib import at_least, seconds, speed_ratio  # noqa: E402

import models
from e2e_verification import onnx_graphs
from e2e_verification.tasks import task_for_model
from utils import UserError, cli

EXAMPLE = """example:
  python bench/export_speed.py --threads 2
  python bench/export_speed.py --models TDNN --speech-batch 8 --frames 1000"""


LOW_OPSET, HIGH_OPSET, _ = onnx_graphs.OPSETS["torchscript"]
OPTIONS = {
    "--models": dict(nargs="+", default=["TDNN", "resnet"], help="registered encoders to time (default TDNN resnet)"),
    "--opset": (at_least(LOW_OPSET, HIGH_OPSET), 17, f"ONNX opset, {LOW_OPSET} to {HIGH_OPSET} (default 17)"),
    **benchlib.out_perf("export_speed"),
}
JSON_NAME = benchlib.perf_json("export_speed")

# Each task's input flags, a --help section apiece; INPUTS below reads them.
SPEECH_INPUT = {
    **benchlib.NCOEF_OPTION,
    "--speech-batch": (at_least(1), 32, "speech batch size (default 32)"),
    "--frames": (
        at_least(onnx_graphs.MIN_FRAMES),
        300,
        f"frames per speech input, >= {onnx_graphs.MIN_FRAMES} (default 300)",
    ),
}
IMAGE_INPUT = {
    "--image-batch": (at_least(1), 64, "image batch size (default 64)"),
    "--image-size": (at_least(1), 32, "image height = width in pixels (default 32)"),
}


def build_parser():
    sections = (("speech input", SPEECH_INPUT), ("image input", IMAGE_INPUT))
    p = benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, *sections, benchlib.DEVICE)
    p.set_defaults(device="cpu")
    return p


# The bench's input per task: (encoder arguments, batch, shape in words) from the bench's flags.
INPUTS = {
    "speech": lambda a: ({"ncoef": a.ncoef}, a.speech_batch, f"{a.ncoef} x {a.frames} frames"),
    "image": lambda a: (
        {"in_channels": 3, "stem": "cifar" if a.image_size < 64 else "imagenet"},
        a.image_batch,
        f"3 x {a.image_size} x {a.image_size}",
    ),
}


def render(record):
    """Markdown: the rows of the performance table (what and command, ours, baseline, ratio), one per encoder."""
    lines = ["| what (command) | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in record["runs"]:
        what = f"embedding one batch of {r['batch']} × {r['shape']} with the exported {r['model']} encoder, "
        what += f"{r['threads']} thread(s) — `{record['command']}`"
        ours = f"onnxruntime {r['onnxruntime']}: {seconds(r['ort_s'])}"
        same = f"outputs equal to {r['max_diff']:.1e}, relative {r['relative_diff']:.1e}"
        lines.append(
            f"| {what} | {ours} | PyTorch: {seconds(r['torch_s'])} | {speed_ratio(r['torch_s'], r['ort_s'])} ({same}) |"
        )
    return "\n".join(lines) + "\n"


def bench_encoder(name, args, device, folder):
    """Export `name`, time PyTorch and onnxruntime on one batch; print parity and the ratio line; -> the run for
    the table."""
    encoder_args, batch, shape = INPUTS[task_for_model(name).name](args)
    config = {
        "model": name,
        "encoder_args": encoder_args,
        "n_classes": 10,
        "softmax": "softmax",
        "hidden_size": 64,
        "n_hidden": 1,
        "dropout_prob": 0.25,
        "ndiscriminators": 1,
        "rproj_size": 0,
    }
    torch.manual_seed(0)
    model = models.build_model(config).to(device).eval()
    spec = onnx_graphs.input_spec(model, args.image_size)
    out = os.path.join(folder, name)
    os.makedirs(out)
    onnx_graphs.export_model(model, out, spec, args.opset, "torchscript")
    sess = onnx_graphs.cpu_session(os.path.join(out, "encoder.onnx"), torch.get_num_threads())
    x = onnx_graphs.example_features(spec, batch=batch, frames=args.frames, seed=3)
    feed = {"features": x.numpy()}

    def run_torch():
        with torch.no_grad():
            return model.embed(x).numpy()

    times = benchlib.best_times(
        {"onnxruntime": lambda: sess.run(None, feed)[0], "pytorch": run_torch}, device, args.repeats
    )
    (ort_s, got), (torch_s, ref) = times["onnxruntime"], times["pytorch"]
    diff = float(np.abs(got - ref).max())
    rel = diff / max(float(np.abs(ref).max()), 1e-30)
    print(f"{name}: batch {batch} x {shape}; max |onnxruntime - PyTorch| {diff:.2e} (relative {rel:.2e})")
    print(benchlib.ratio_line(f"{name} embedding, onnxruntime", ort_s, "PyTorch", torch_s))
    run = dict(model=name, batch=batch, shape=shape, threads=torch.get_num_threads(), ort_s=ort_s, torch_s=torch_s)
    return {**run, "max_diff": diff, "relative_diff": rel}


def main(argv=None):
    args, device = benchlib.start(build_parser(), argv)
    if device.type != "cpu":
        raise UserError("this bench compares CPU inference: onnxruntime is installed as its CPU build")
    unknown = [name for name in args.models if name not in models.encoder_names()]
    if unknown:
        raise UserError(f"unknown encoder(s) {', '.join(unknown)}; known: {', '.join(models.encoder_names())}")
    import onnxruntime

    print(benchlib.describe(device) + f"; onnxruntime {onnxruntime.__version__} ({torch.get_num_threads()} threads)")
    if args.out:  # the JSON's folder, made before the work (the page's own folder is checked while parsing)
        benchlib.make_folder(
            os.path.dirname(os.path.join(os.path.dirname(os.path.abspath(args.out)), JSON_NAME)), "--out"
        )
    with tempfile.TemporaryDirectory(prefix="bench_export.") as folder:
        runs = [bench_encoder(name, args, device, folder) for name in args.models]
    for run in runs:
        run.update(device=benchlib.describe(device), onnxruntime=onnxruntime.__version__)
    benchlib.publish(__file__, argv, args, runs, render, args.out, JSON_NAME)
    return 0


if __name__ == "__main__":
    cli(main)
