"""Export a trained checkpoint to ONNX: the encoder and the learned distance as two graphs, for serving.

Writes, atomically, into the folder --out (refused if it exists and is not empty, unless --force, which
replaces only an earlier export):
  encoder.onnx   input `features`, float32: speech (batch, ncoef, frames) with batch and frames dynamic,
                 images (batch, channels, height, width) with batch dynamic, at the size the checkpoint records
                 it was trained on (or --image-size); output `embedding` (batch, emb)
  distance.onnx  inputs `enroll`, `test`, float32 (pairs, emb) with pairs dynamic; outputs `logit` (pairs,),
                 the mean of the heads' logits, and `probability` (pairs,), the mean of their sigmoids
                 (the e2e score of eval.py)
  export.json    model name, input layout, embedding size, opset, exporter, the checkpoint's model_config and
                 provenance (checkpoints.model_provenance), what each graph expects, and the parity of the
                 graphs against PyTorch (when onnxruntime is here)
  encoder.pt, distance.pt   with --torchscript: the same two modules traced with torch.jit.trace

The graphs are traced through the model's own methods (VerifierModel.embed, LearnedDistance.forward and
.score), so they compute what eval.py computes. The default exporter is the TorchScript one
(`dynamo=False`): it exports every registered encoder with dynamic axes, including resnet_lstm,
which the torch.export-based exporter (--exporter dynamo) cannot trace with a dynamic time axis.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import os

import torch

from e2e_verification.checkpoints import load_model_and_state, model_provenance
from e2e_verification.onnx_graphs import OPSETS, export_model, graph_notes, input_spec, root_cause
from e2e_verification.tasks import task_for_model
from utils import (
    UserError,
    add_device_flags,
    atomic_folder,
    check_output_folder,
    cli,
    device_from_args,
    make_parser,
    write_json,
)

EXAMPLE = """example:
  python export.py --cp-path cp/checkpoint_10ep.pt --out exp/onnx/
  python export.py --cp-path cp/checkpoint_10ep.pt --out exp/onnx/ --torchscript --force"""


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--out", required=True, help="output folder; new or empty (its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier export")
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
        help="image models: input height = width in pixels (default: the size the checkpoint was trained on; "
        "for checkpoints that do not record it 32, or 84 for the imagenet stem)",
    )
    add_device_flags(p)
    p.set_defaults(device="cpu")
    return p


def check_output(out, force, cp_path):
    """The absolute --out path, checked before any work (utils.check_output_folder): with `force` it replaces
    only an earlier export, a folder holding export's output marker or, written before that marker, export.json."""
    return check_output_folder("--out", out, "export", force, {"--cp-path": cp_path}, legacy="export.json")


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
    out = check_output(args.out, args.force, args.cp_path)
    device = device_from_args(args)
    model, state = load_model_and_state(args.cp_path, None, device)
    name, emb_size = model.config["model"], model.encoder.embedding_size
    domain = task_for_model(name).name
    if args.image_size is not None and domain != "image":
        raise UserError(f"--image-size applies to image models; {args.cp_path} holds a {domain} model ({name})")
    spec = input_spec(model, args.image_size)
    print(
        f"exporting {name} ({spec['domain']}, input {spec['shape']}, embedding {emb_size}) with the "
        f"{args.exporter} exporter, opset {opset}",
        flush=True,
    )
    with atomic_folder(out, "export", checkpoint=os.path.abspath(args.cp_path)) as tmp:
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
            "provenance": model_provenance(model),
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
