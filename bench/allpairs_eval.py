"""All-pairs evaluation at scale: peak memory per trial and wall time of eval.py on N test images.

Writes the first N Fashion-MNIST test images as IDX files in a temporary folder and an untrained
checkpoint (train.py's default distance: one hidden layer of 512; encoder --model), then runs eval.py
on them in a fresh process per measurement and reads that process's peak resident memory
(getrusage) and wall time. Each `--variant` is one run with its eval.py flags (`text` writes the text
score file, `none` passes --no-score-file, `npy` --score-format npy). With `--before DIR` the same
runs use the eval.py of another checkout too (e.g. the previous commit, exported with
`git archive HEAD | tar -x -C DIR`), and the EER and minDCF of the scorers both report must be identical.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import benchlib
import torch

import models
from data_load import FASHION_DIR
from e2e_verification.checkpoints import save_checkpoint
from utils import UserError, cli

EXAMPLE = """examples:
  python bench/allpairs_eval.py --n 2000
  python bench/allpairs_eval.py --n 10000 --variant text none npy --before /tmp/eval-before"""

VARIANTS = {"text": [], "none": ["--no-score-file"], "npy": ["--score-format", "npy"]}


def write_subset(source, folder, n):
    """The first n test images and labels of the IDX files in `source` -> uncompressed IDX files in `folder`."""
    for kind, header_size, item_size in (("images-idx3-ubyte", 16, 28 * 28), ("labels-idx1-ubyte", 8, 1)):
        path = os.path.join(source, f"t10k-{kind}")
        opener = gzip.open if not os.path.exists(path) else open
        with opener(path if os.path.exists(path) else path + ".gz", "rb") as handle:
            header = bytearray(handle.read(header_size))
            available = struct.unpack(">I", header[4:8])[0]
            if n > available:
                raise UserError(f"{source} holds {available} test images, fewer than --n {n}")
            header[4:8] = struct.pack(">I", n)
            data = handle.read(n * item_size)
        with open(os.path.join(folder, f"t10k-{kind}"), "wb") as handle:
            handle.write(bytes(header) + data)


def write_model(path, model):
    """An untrained checkpoint of a 1-channel 28x28 image model with train.py's default learned distance."""
    torch.manual_seed(0)
    config = {"model": model, "encoder_args": {"in_channels": 1, "stem": "cifar"}, "n_classes": 10}
    config.update(softmax="am_softmax", margin=0.35, scale=30.0, hidden_size=512, n_hidden=1, dropout_prob=0.25)
    config.update(ndiscriminators=1, rproj_size=0, trainable_rproj=False)
    net = models.build_model(config)
    state = {"format": 1, "model_config": net.config, "model_state": net.state_dict(), "epoch": 0, "history": {}}
    save_checkpoint(path, state)


def measure(repo, argv, env):
    """Run `repo`/eval.py with argv in a fresh process: -> (wall seconds, peak RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(repo, "eval.py"), *argv], cwd=repo, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise UserError(f"{repo}/eval.py {' '.join(argv)} failed (exit {os.waitstatus_to_exitcode(status)})")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


OPTIONS = {
    "--data": (str, FASHION_DIR, f"Fashion-MNIST IDX folder (default {FASHION_DIR})"),
    "--n": (benchlib.at_least(2), 10_000, "test images, all pairs scored (default 10000)"),
    "--model": (str, "resnet", "image encoder of the untrained checkpoint (default resnet)"),
    "--variant": dict(nargs="+", choices=list(VARIANTS), default=["text", "none"], help="runs to measure"),
    "--before": (str, None, "another checkout whose eval.py runs too (its score file: text)"),
    "--keep": (str, None, "write the outputs here instead of a temporary folder"),
}


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.RUN_THREADS)


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH="")
    trials = args.n * (args.n - 1) // 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        benchlib.make_folder(os.path.join(work, "data"), "--keep")
        write_subset(args.data, os.path.join(work, "data"), args.n)
        checkpoint = os.path.join(work, "cp.pt")
        write_model(checkpoint, args.model)
        print(f"{args.n} Fashion-MNIST test images, {trials} trials; model {args.model}, {args.threads} threads")
        runs = [(f"after/{v}", root, VARIANTS[v]) for v in args.variant]
        if args.before:
            runs.insert(0, ("before/text", os.path.abspath(args.before), []))
        results = {}
        for label, repo, flags in runs:
            out = os.path.join(work, label.replace("/", "_") + (".npz" if "npy" in flags else ".out"))
            base = ["--data-path", os.path.join(work, "data"), "--cp-path", checkpoint, "--device", "cpu"]
            seconds, peak = measure(repo, [*base, "--out-path", out, *flags], env)
            summary = json.load(open(out + ".json"))
            size = os.path.getsize(out) if os.path.exists(out) else 0
            results[label] = summary["metrics"]
            print(
                f"{label:12s} {seconds:8.1f} s  peak RSS {peak / 2**30:6.2f} GiB = {peak / trials:6.1f} bytes/trial  "
                f"score file {size / 2**30:5.2f} GiB"
            )
        for label, metrics in results.items():
            print(f"{label:12s} " + "  ".join(f"{name} EER {m['eer']:.6f}" for name, m in metrics.items()))
        if args.before:
            before = results["before/text"]
            differ = [
                f"{label} {name} {key}: {metrics[name][key]!r} (before {before[name][key]!r})"
                for label, metrics in results.items()
                for name in before
                for key in before[name]
                if (key == "eer" or key.startswith("mindcf")) and before[name][key] != metrics[name][key]
            ]
            print("\n".join(differ))
            same = not differ
            print(f"EER and minDCF identical before and after: {'yes' if same else 'NO'}")
            return 0 if same else 1
    return 0


if __name__ == "__main__":
    cli(main)
