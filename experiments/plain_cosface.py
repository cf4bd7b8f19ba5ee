"""The plain CosFace baseline: what a user would run instead of the toolkit's image recipe.

An encoder of models/ (the toolkit's own class and width) trained by a plain loop: shuffled batches of
--batch-size, pytorch-metric-learning's CosFaceLoss (margin 0.35, scale 30: the AM-softmax loss) on the
encoder's classification output, SGD at a constant learning rate. Its embedding is what the loss
normalises. Scored with cosine on all pairs of held-out validation classes (model selection) and, with
--test, of the test classes (e2e_verification.metrics: EER, minDCF(0.01)).

Protocols (train -> validation -> test; no class is in two of them):
  fonts        tools/font_set.py --valid-open: training fonts -> valid/ families -> test/ families
  fmnist-open  Fashion-MNIST classes 0-4 (--fmnist-items images each) -> classes 5-9 of the training
               split (--eval-items each; the images of the test split are never used for selection)
               -> classes 5-9 of the test split (--eval-items each)
"""

import dataclasses
import os
import sys

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchlib import at_least, mean_sd, name_list, positive_float  # noqa: E402

import data_load  # noqa: E402
from e2e_verification.metrics import compute_metrics  # noqa: E402
from utils import UserError, cli, seed_everything  # noqa: E402

EXAMPLE = """example:
  python tools/font_set.py --out runs/fonts16 --size 16 --test-families 40 --valid-open
  python experiments/plain_cosface.py --protocols fonts,fmnist-open --fonts runs/fonts16 --width 16 --seeds 1,2,3 \\
      --out docs/results/plain_cosface.md"""

SPLITS = ("valid", "test")


@dataclasses.dataclass
class Sets:
    """A protocol's data: the training set (augmentation off), the held-out sets by split, and train.py's data flags."""

    train: object
    held_out: dict
    train_flags: list
    n_classes: int


def in_memory(dataset, pad):
    """Decode an image dataset once into data_load.TensorImages (crop padding `pad`, no flip), for fast epochs."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=1024)
    images = torch.cat([x for x, _ in loader])
    return data_load.TensorImages(images, dataset.labels, pad=pad, name=dataset.name)


def fonts_sets(args):
    """The font set (--valid-open): train/, valid/ (unseen families) and test/ (unseen families)."""
    folder = args.fonts
    if not os.path.isdir(os.path.join(folder, "valid")):
        raise UserError(f"--fonts {folder}: no valid/ (build it with tools/font_set.py --valid-open)")
    train = data_load.load_images(f"{folder}/train", "train")
    train.set_augmentation(crop=False, flip=False)
    held = {}
    for split in SPLITS:
        part = data_load.load_images(f"{folder}/{split}", split)
        held[split] = data_load.select_classes(part, None, args.eval_items)
    n_classes = int(train.labels.max()) + 1
    return Sets(in_memory(train, 4), held, ["--data-path", f"{folder}/train"], n_classes)


def fmnist_sets(args):
    """Fashion-MNIST: train on 0-4, select on 5-9 of the training split, test on 5-9 of the test split."""
    source = data_load.FASHION_DIR
    n = args.fmnist_items
    full = data_load.load_images(source, "train")
    full.set_augmentation(crop=False, flip=False)
    train = data_load.select_classes(full, "0-4", n)
    valid = data_load.select_classes(full, "5-9", args.eval_items)
    test = data_load.select_classes(data_load.load_images(source, "test"), "5-9", args.eval_items)
    flags = ["--data-path", source, "--classes", "0-4", "--items-per-class", str(n)]
    return Sets(in_memory(train, 2), {"valid": valid, "test": test}, flags, 5)


PROTOCOLS = {"fonts": fonts_sets, "fmnist-open": fmnist_sets}


@torch.no_grad()
def embed(encoder, dataset, output=1, batch_size=512):
    """The encoder's `output` (0: embedding, 1: classification input) of every item -> (N, d) float32, labels (N,)."""
    encoder.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    embs, labels = [], []
    for x, y in loader:
        embs.append(encoder(x)[output].float())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels)


@torch.no_grad()
def cosine_pairs(emb, labels, rows=256):
    """Cosines and same-class flags of all N(N-1)/2 pairs i < j: -> (pairs,) float32, (pairs,) bool."""
    norm = F.normalize(emb, dim=1)
    scores, same = [], []
    for start in range(0, len(emb) - 1, rows):
        stop = min(start + rows, len(emb) - 1)
        mask = torch.ones(stop - start, len(emb) - start - 1, dtype=torch.bool).triu_()
        scores.append((norm[start:stop] @ norm[start + 1 :].t())[mask])
        same.append((labels[start:stop, None] == labels[None, start + 1 :])[mask])
    return torch.cat(scores), torch.cat(same)


def cosine_metrics(emb, labels):
    """EER, minDCF(0.01) and AUC of cosine scoring over all pairs."""
    return compute_metrics(*cosine_pairs(emb, labels), p_targets=(0.01,))


def build_encoder(args, sets):
    """The toolkit's image encoder (models registry) for the protocol's images, at --width."""
    import models

    shape = sets.train.image_shape
    encoder_args = {"in_channels": shape[0], "stem": data_load.image_stem(shape), "width": args.width}
    return models.create_encoder(args.model, **encoder_args), encoder_args


def train_plain(args, sets, seed, augment="none"):
    """The plain loop: shuffled batches, CosFaceLoss on the classification output, constant-LR SGD -> encoder."""
    from pytorch_metric_learning.losses import CosFaceLoss

    seed_everything(seed)
    encoder, encoder_args = build_encoder(args, sets)
    loss_fn = CosFaceLoss(num_classes=sets.n_classes, embedding_size=encoder.latent_size, margin=0.35, scale=30)
    params = [*encoder.parameters(), *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.l2)
    data = sets.train
    data.set_augmentation(crop=augment == "crop", flip=False)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=generator)  # fmt: skip
    for _ in range(args.epochs):
        encoder.train()
        for x, y in loader:
            loss = loss_fn(encoder(x)[1], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    data.set_augmentation(crop=False, flip=False)
    return encoder.eval(), encoder_args


def score_encoder(encoder, sets, splits, outputs=(("cos", 1),)):
    """{split: {name: cosine metrics of encoder output}} for the held-out `splits`."""
    out = {}
    for split in splits:
        results = {}
        for name, output in outputs:
            emb, labels = embed(encoder, sets.held_out[split], output)
            results[name] = cosine_metrics(emb, labels)
        out[split] = results
    return out


RUN_OPTIONS = {
    "--protocols": (name_list(PROTOCOLS, "protocol"), "fonts", "comma-separated, from: " + ", ".join(PROTOCOLS)),
    "--seeds": benchlib.SEEDS_OPTION["--seeds"],
    "--test": dict(action="store_true", help="also score the test classes (once, for the final choice)"),
}
RECIPE_OPTIONS = {
    "--model": (str, "resnet", "image encoder of models/ (default resnet)"),
    "--width": (at_least(1), 16, "resnet first-stage width (default 16)"),
    "--epochs": (at_least(1), 3, "epochs (default 3)"),
    "--batch-size": (at_least(2), 64, "images per shuffled batch (default 64)"),
    "--lr": (positive_float, 0.05, "constant SGD learning rate (default 0.05, recipes/image_small.args)"),
    "--momentum": (benchlib.number(float, 0, 1), 0.9, "SGD momentum (default 0.9)"),
    "--l2": (benchlib.number(float, 0), 1e-4, "weight decay (default 1e-4, recipes/image_small.args)"),
    "--augment": dict(choices=("none", "crop"), default="none", help="random shift of the training images (none)"),
}
DATA_OPTIONS = {
    "--fonts": (str, "runs/fonts16", "font set folder from tools/font_set.py --valid-open (default runs/fonts16)"),
    "--fmnist-items": (at_least(2), 200, "Fashion-MNIST training images per class (default 200)"),
    "--eval-items": (at_least(2), 20, "held-out items scored per class, a seeded draw (default 20)"),
    "--threads": (at_least(1), 1, "torch CPU threads (default 1)"),
}


def build_parser():
    out = benchlib.out_table("plain_cosface")
    return benchlib.make_parser(__doc__, EXAMPLE, ("what to run", RUN_OPTIONS), ("recipe", RECIPE_OPTIONS),
                                ("data", {**DATA_OPTIONS, **out}))  # fmt: skip


def render(record):
    """Markdown: one row per protocol and split, mean ± sd over seeds of cosine EER and minDCF(0.01)."""
    runs = record["runs"]
    lines = ["| protocol | split | seeds | cosine EER | cosine minDCF(0.01) |", "|---|---|---|---|---|"]
    keys = sorted({(r["protocol"], split) for r in runs for split in r["metrics"]})
    for protocol, split in keys:
        got = [r["metrics"][split]["cos"] for r in runs if r["protocol"] == protocol and split in r["metrics"]]
        eer, dcf = mean_sd([m["eer"] for m in got]), mean_sd([m["mindcf_0.01"] for m in got])
        lines.append(f"| {protocol} | {split} | {len(got)} | {eer} | {dcf} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = SPLITS if args.test else SPLITS[:1]
    runs = []
    for protocol in args.protocols:
        sets = PROTOCOLS[protocol](args)
        for seed in args.seeds:
            encoder, _ = train_plain(args, sets, seed, args.augment)
            metrics = score_encoder(encoder, sets, splits)
            runs.append({"protocol": protocol, "seed": seed, "metrics": metrics})
            print(f"{protocol} seed {seed}: " + "  ".join(f"{s} cos EER {m['cos']['eer']:.4f}" for s, m in
                                                          metrics.items()), flush=True)  # fmt: skip
    benchlib.publish(__file__, argv, args, runs, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
