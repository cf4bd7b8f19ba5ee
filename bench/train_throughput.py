"""Training throughput with the real data loaders against the same model fed from memory.

TDNN: random features written as a Kaldi ark, converted by data_prep.py to the training HDF5 and
read back by its loader (random crops, DataLoader workers, pinned memory, prefetch: train.py's
make_loaders). ResNet: CIFAR-shaped images in memory with random crop and flip (the CIFAR-10
loader; --image-path reads a real image source instead). The bound: one batch already on the
device, stepped again and again. Both run TrainLoop.train_step, with fixed-length speech crops.
"""

import os
import tempfile
import time

import benchlib
import torch
from benchlib import at_least

import data_load
import models
from e2e_verification import training
from e2e_verification.tasks import task_for_model
from utils import cli

EXAMPLE = """example:
  python bench/train_throughput.py --device cpu
  python bench/train_throughput.py --device cuda --precisions fp32,bf16"""


def endless(loader):
    """Batches of `loader`, epoch after epoch."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def make_speech_hdf5(folder, speakers_flag=None):
    """A writer of random features -> Kaldi ark/scp -> data_prep's conversion -> train.hdf in `folder` (the
    task calls it)."""

    def make(speakers, utts, n_frames, ncoef):
        benchlib.make_kaldi_features(folder, speakers_flag or speakers, utts, 2 * n_frames, ncoef)
        return benchlib.kaldi_to_hdf5(folder)

    return make


def build_trainer(flags, device):
    """train.py's own builder for `flags`: -> (TrainLoop, loader). With no data flag, CIFAR-shaped noise in memory."""
    args = training.build_parser().parse_args(flags)
    datasets = None
    if not args.train_hdf_file and not args.data_path:
        images, labels = torch.randn(5000, 3, 32, 32), torch.arange(5000) % 10
        noise = data_load.TensorImages(images, labels, pad=4, flip=True, name="cifar-shaped")
        datasets = (noise, None, 10, {"in_channels": 3, "stem": "cifar"})
    run = training.build(args, flags, device, announce=False, datasets=datasets)
    run.trainer.valid_loader = None
    return run.trainer, run.trainer.train_loader


def steps_per_second(trainer, batches, device, warmup, steps):
    """Run `warmup` then `steps` train steps on `batches` (an iterator); -> (steps/s, samples/s)."""
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    benchlib.sync(device)
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        trainer.train_step(x, y)
        samples += len(y)
    benchlib.sync(device)
    seconds = time.perf_counter() - start
    return steps / seconds, samples / seconds


def loader_rate(batches, count):
    """Samples/s of `count` batches drawn from `batches` with no training: what the data path can deliver."""
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        samples += len(next(batches)[1])
    return samples / (time.perf_counter() - start)


def measure(flags, device, args):
    """Throughput of one model and precision: -> (loader alone, training on the loader, in memory) samples/s."""
    trainer, loader = build_trainer(flags, device)
    batches = endless(loader)
    next(batches)  # start the workers
    alone = loader_rate(batches, max(args.steps, 20))
    x, y = next(batches)
    x, y = x.to(device), y.to(device)
    fixed = iter(lambda: (x, y), None)
    real = bound = 0.0
    for _ in range(args.repeats):  # alternate, best of each: a shared machine's load drifts
        real = max(real, steps_per_second(trainer, batches, device, args.warmup, args.steps)[1])
        bound = max(bound, steps_per_second(trainer, fixed, device, args.warmup, args.steps)[1])
    return alone, real, bound


OPTIONS = {
    "--models": (
        benchlib.name_list(models.encoder_names(), "encoder"),
        "TDNN,resnet",
        "comma-separated encoders (default TDNN,resnet)",
    ),
    "--precisions": (
        benchlib.name_list(("fp32", "bf16"), "precision"),
        None,
        "fp32 and/or bf16, comma-separated (default fp32,bf16 on a GPU, fp32 on a CPU)",
    ),
    "--steps": (
        at_least(1),
        None,
        "timed steps per measurement (default 200 on a GPU, well past the loader's prefetch; 3 on a CPU)",
    ),
    "--warmup": (at_least(0), 2, "untimed steps first (default 2)"),
    "--batch-size": (at_least(1), None, "speaker groups (speech) or images per batch"),
    "--n-frames": (at_least(1), None, "speech crop length (default 800 GPU, 200 CPU)"),
    "--workers": (at_least(0), None, "loader workers (default train.py's)"),
    "--compile": ("torch.compile the encoder",),
    "--image-path": (str, None, "real images for ResNet (CIFAR-10, IDX, folders)"),
    "--speakers": (at_least(2), None, "speakers of 20 utterances (default: 25 batches)"),
    "--work-dir": (str, None, "folder for the Kaldi features and HDF5 (default: temporary)"),
    **benchlib.out_perf("train_throughput"),
}
JSON_NAME = benchlib.perf_json("train_throughput")
# What each task's real loader reads, for the table.
LOADERS = {"speech": "HDF5 loader (random crops)", "image": "image loader (random crop and flip)"}


def render(record):
    """Markdown: the rows of the performance table (what and command, ours, baseline, ratio), one per model and
    precision."""
    lines = ["| what (command) | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in record["runs"]:
        what = (
            f"{r['model']} training ({r['precision']}, batch {r['batch']}), {LOADERS[r['task']]} vs the same batch "
            f"in memory — `{record['command']}`"
        )
        ours = f"real loader: {r['real']:.1f} samples/s (the loader alone delivers {r['alone']:.1f})"
        share = f"**{100 * r['real'] / r['bound']:.0f} %** of the in-memory rate"
        lines.append(f"| {what} | {ours} | in memory: {r['bound']:.1f} samples/s | {share} |")
    return "\n".join(lines) + "\n"


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.DEVICE)


def run(args, device, folder):
    """Measure each model and precision, print the rates; -> the runs for the table."""
    print(benchlib.describe(device))
    precisions = args.precisions or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    if args.steps is None:
        args.steps = 200 if device.type == "cuda" else 3
    runs = []
    for name in args.models:
        task = task_for_model(name)
        batch, n_frames = task.bench_sizes(device)
        batch, n_frames = args.batch_size or batch, args.n_frames or n_frames
        cp = os.path.join(folder, "cp")  # (--no-cp: nothing is written there) beside, not holding, the data
        flags = ["--model", name, "--batch-size", str(batch), "--device", str(device), "--checkpoint-path", cp]
        flags += [
            "--no-cp",
            *task.bench_flags(batch, n_frames, args.image_path, make_speech_hdf5(folder, args.speakers)),
        ]
        flags += ["--workers", str(args.workers)] if args.workers is not None else []
        flags += ["--compile"] if args.compile else []
        rates = {}
        for precision in precisions:
            alone, real, bound = measure(flags + (["--amp"] if precision == "bf16" else []), device, args)
            rates[precision] = real
            runs.append(dict(model=name, task=task.name, precision=precision, batch=batch, n_frames=n_frames))
            runs[-1].update(device=benchlib.describe(device), alone=alone, real=real, bound=bound)
            print(
                f"{name} {precision}, batch {batch}: training on the real loader {real:.1f} samples/s, "
                f"in memory {bound:.1f}; the loader alone delivers {alone:.1f}"
            )
            print(f"  real loader reaches {100 * real / bound:.1f}% of the in-memory bound")
        if "fp32" in rates and "bf16" in rates:
            print(f"  {name} bf16 / fp32 with the real loader: {rates['bf16'] / rates['fp32']:.2f}x")
    return runs


def main(argv=None):
    args, device = benchlib.start(build_parser(), argv)
    if args.out:  # the JSON's folder, made before the work (the page's own folder is checked while parsing)
        benchlib.make_json_folder(args.out, JSON_NAME)
    if args.work_dir:
        runs = run(args, device, benchlib.make_folder(args.work_dir, "--work-dir"))
    else:
        with tempfile.TemporaryDirectory() as folder:
            runs = run(args, device, folder)
    benchlib.publish(__file__, argv, args, runs, render, args.out, JSON_NAME)
    return 0


if __name__ == "__main__":
    cli(main)
