"""How fast does the image recipe learn? Test cosine EER after a few and after more epochs, against a plain loop.

On 1,000 Fashion-MNIST training images (--train-items-per-class per class), with the same encoder
(the toolkit's pre-activation `resnet` at --width), batch 64, SGD lr 1e-2, momentum 0.9, weight
decay 1e-4, each row trains for --epochs epochs and is tested on all pairs of --test-items-per-class
test images per class after --early-epoch epochs and at the end:

  baseline     a plain loop written here: pytorch-metric-learning's CosFaceLoss (m 0.35, s 30) on the
               embedding, shuffled batches, no augmentation, the standard pre-activation ResNet
               (BN-ReLU after the last stage; --final-norm)
  research     train.py with the research code's CIFAR-10 command line (seed README): AM-softmax,
               label smoothing 0.05, learned distance 3 x 350 units, its data pipeline and sampler
  recommended  train.py with the README's image recipe
  and single changes of the research line (--rows), to see which of its choices costs what.

train.py and eval.py run in subprocesses (eval.py scores e2e, cosine and fused for the toolkit rows;
with --scorers cos every row is scored by cosine here, which is quicker). Prints a markdown table of
mean EERs over --seeds and CPU seconds per epoch.
"""

import json
import os
import statistics
import sys
import time

# benchlib (the shared helpers of bench/ and experiments/) lives in bench/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchlib  # noqa: E402
import torch  # noqa: E402
from benchlib import at_least, children_cpu_seconds, python  # noqa: E402

from data_load import FASHION_DIR  # noqa: E402
from utils import UserError, choose_device, cli  # noqa: E402

EXAMPLE = """examples:
  python experiments/learning_speed.py --seeds 1,2
  python experiments/learning_speed.py --rows research,no-flip,no-augment,final-norm,pair-weight-0,random-batches \\
      --width 8 --seeds 1 --scorers cos --out docs/results/learning_speed_ablation.md"""

SCORERS = ("cos", "e2e", "fus")
# The research code's CIFAR-10 command line (seed README) less its paths, run length and batch size.
RESEARCH = ["--hidden-size", "350", "--n-hidden", "3", "--dropout-prob", "0.01", "--softmax", "am_softmax"]
RESEARCH += ["--smoothing", "0.05"]
# The README's image recipe: the research heads, with the data pipeline and encoder fixed for small image sets.
RECOMMENDED = [*RESEARCH, "--augment", "none", "--final-norm"]
ROWS = {
    "baseline": None,  # the plain loop of this file
    "baseline-no-final-norm": None,  # the same, on the research code's ResNet (no final BN-ReLU)
    "research": RESEARCH,
    "recommended": RECOMMENDED,
    "recommended-random": [*RECOMMENDED, "--sampler", "random"],
    "no-flip": [*RESEARCH, "--augment", "crop"],
    "no-augment": [*RESEARCH, "--augment", "none"],
    "final-norm": [*RESEARCH, "--final-norm"],
    "pair-weight-0": [*RESEARCH, "--pair-weight", "0"],
    "pair-weight-0.1": [*RESEARCH, "--pair-weight", "0.1"],
    "random-batches": [*RESEARCH, "--sampler", "random"],
    "no-smoothing": [*RESEARCH, "--smoothing", "0"],
    "softmax": [*RESEARCH, "--softmax", "softmax"],
    "softmax-scale-30": [*RESEARCH, "--softmax", "softmax", "--softmax-scale", "30"],
}


def test_set(args):
    """The test images eval.py scores with --items-per-class (the same seeded draw)."""
    import data_load

    return data_load.select_classes(data_load.load_images(args.data_path, "test"), None, args.test_items_per_class)


@torch.no_grad()
def cosine_eer(encoder, test):
    """Cosine EER over all pairs of the test set; `encoder` maps (batch, 1, H, W) to (embedding, latent)."""
    from e2e_verification.metrics import compute_eer

    encoder.eval()
    loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False)
    device = next(encoder.parameters()).device
    emb = torch.cat([encoder(x.to(device))[0].float().cpu() for x, _ in loader])
    labels = torch.as_tensor(test.labels)
    emb = torch.nn.functional.normalize(emb, dim=1)
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    scores = (emb[i] * emb[j]).sum(1)
    return float(compute_eer(scores.numpy(), (labels[i] == labels[j]).numpy()))


def run_baseline(args, seed, final_norm, test):
    """The plain loop: encoder + CosFaceLoss, shuffled batches, no augmentation; -> {epoch: {'cos': EER}}."""
    from pytorch_metric_learning.losses import CosFaceLoss

    import data_load
    import models

    torch.manual_seed(seed)
    base = data_load.set_augmentation(data_load.load_images(args.data_path, "train"), "none")
    train = data_load.select_classes(base, None, args.train_items_per_class)
    n_classes = int(train.labels.max()) + 1
    encoder = models.create_encoder(
        "resnet", in_channels=train.image_shape[0], stem="cifar", width=args.width, final_norm=final_norm
    )
    loss_fn = CosFaceLoss(num_classes=n_classes, embedding_size=encoder.embedding_size, margin=0.35, scale=30)
    device = torch.device(args.device)
    encoder, loss_fn = encoder.to(device), loss_fn.to(device)
    params = list(encoder.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    results, cpu = {}, 0.0
    for epoch in range(1, args.epochs + 1):
        start = time.process_time()
        encoder.train()
        for x, y in loader:
            loss = loss_fn(encoder(x.to(device))[0], y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        cpu += time.process_time() - start
        if epoch in (args.early_epoch, args.epochs):
            results[epoch] = {"cos": cosine_eer(encoder, test)}
    return results, cpu / args.epochs


def run_toolkit(args, seed, flags, folder, test):
    """train.py with `flags`, checkpoints every --early-epoch epochs; each scored by eval.py or cosine here."""
    from e2e_verification.checkpoints import load_model

    cp = os.path.join(folder, "cp")
    common = ["--data-path", args.data_path, "--items-per-class", str(args.train_items_per_class)]
    common += ["--model", "resnet", "--width", str(args.width), "--batch-size", str(args.batch_size)]
    common += ["--lr", str(args.lr), "--momentum", "0.9", "--l2", "1e-4", "--epochs", str(args.epochs)]
    common += ["--save-every", str(args.early_epoch), "--seed", str(seed), "--checkpoint-path", cp]
    start = children_cpu_seconds()
    python("train.py", *common, *flags, "--device", args.device, "--verbose", "0", threads=args.threads)
    cpu = (children_cpu_seconds() - start) / args.epochs
    results = {}
    for epoch in (args.early_epoch, args.epochs):
        path = os.path.join(cp, f"checkpoint_{epoch}ep.pt")
        if args.scorers == "cos":
            results[epoch] = {"cos": cosine_eer(load_model(path, device=args.device).encoder, test)}
            continue
        out = os.path.join(folder, f"scores_{epoch}ep.out")
        python("eval.py", "--cp-path", path, "--data-path", args.data_path, "--items-per-class",
               str(args.test_items_per_class), "--out-path", out, "--no-score-file", "--device", args.device,
               threads=args.threads)  # fmt: skip
        with open(out + ".json") as handle:
            metrics = json.load(handle)["metrics"]
        results[epoch] = {s: metrics[s]["eer"] for s in SCORERS}
    return results, cpu


def cell(runs, epoch, scorer):
    values = [r[epoch][scorer] for r in runs if scorer in r[epoch]]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def render(record):
    """Markdown: one line per row, mean (± sd) over seeds; the ratio of cosine EERs to the baseline's."""
    e1, e2 = record["args"]["early_epoch"], record["args"]["epochs"]
    rows = {}
    for run in record["runs"]:
        runs, cpus = rows.setdefault(run["row"], ([], []))
        runs.append({int(epoch): eers for epoch, eers in run["eer"].items()})
        cpus.append(run["cpu_s_per_epoch"])
    head = f"| row | seeds | cos EER @{e1} | cos EER @{e2} | e2e EER @{e1} | e2e EER @{e2} | fus EER @{e1} "
    head += f"| fus EER @{e2} | cos / baseline @{e1} | cos / baseline @{e2} | CPU s / epoch |"
    lines = [head, "|" + "---|" * 11]
    base = rows.get("baseline")
    for name, (runs, cpus) in rows.items():
        cells = [cell(runs, e, s) for s in SCORERS for e in (e1, e2)]
        for e in (e1, e2):
            if base is None:
                cells.append("-")
                continue
            ours = statistics.mean(r[e]["cos"] for r in runs)
            theirs = statistics.mean(r[e]["cos"] for r in base[0])
            cells.append(f"{ours / theirs:.2f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {statistics.mean(cpus):.0f} |")
    return "\n".join(lines) + "\n"


RUN_OPTIONS = {
    "--rows": (
        benchlib.name_list(ROWS, "row"),
        "baseline,research,recommended",
        "comma-separated, from: " + ", ".join(ROWS),
    ),
    "--seeds": (benchlib.int_list(), "1,2", "seeds, e.g. 1,2 or 1-3 (default 1,2)"),
    "--scorers": dict(
        choices=("all", "cos"),
        default="all",
        help="all: toolkit rows scored by eval.py (e2e, cos, fus; default); cos: cosine only, computed here",
    ),
    "--device": (str, "cpu", "device of every row: cpu (default), cuda or cuda:N"),
    "--threads": (at_least(1), 2, "torch threads of each run (default 2)"),
}
DATA_OPTIONS = {
    "--data-path": (str, FASHION_DIR, f"Fashion-MNIST (or MNIST) IDX folder (default {FASHION_DIR})"),
    "--train-items-per-class": (at_least(2), 100, "training images per class (default 100)"),
    "--test-items-per-class": (at_least(2), 200, "test images per class (default 200)"),
}
RECIPE_OPTIONS = {
    "--width": (at_least(1), 16, "resnet first-stage channels, every row (default 16)"),
    "--epochs": (at_least(2), 10, "epochs of every row, a multiple of --early-epoch (default 10)"),
    "--early-epoch": (at_least(1), 2, "the early test point, in epochs (default 2)"),
    "--batch-size": (at_least(2), 64, "images per batch (default 64)"),
    "--lr": (benchlib.positive_float, 1e-2, "SGD learning rate of every row (default 1e-2)"),
}
FILE_OPTIONS = {"--work-dir": (str, "runs/learning_speed", "checkpoints and scores (default there)")}


def build_parser():
    return benchlib.make_parser(
        __doc__,
        EXAMPLE,
        ("what to run", RUN_OPTIONS),
        ("data", DATA_OPTIONS),
        ("recipe, the same for every row", RECIPE_OPTIONS),
        ("files", {**FILE_OPTIONS, **benchlib.out_table("learning_speed")}),
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs % args.early_epoch or args.early_epoch >= args.epochs:
        raise UserError("--epochs must be a multiple of --early-epoch, and larger (checkpoints every early epoch)")
    args.device = str(choose_device(args.device))
    torch.set_num_threads(args.threads)
    test = test_set(args)
    every = []
    for name in args.rows:
        for seed in args.seeds:
            if ROWS[name] is None:
                result, cpu = run_baseline(args, seed, name == "baseline", test)
            else:
                folder = os.path.join(args.work_dir, f"{name}_w{args.width}_s{seed}")
                result, cpu = run_toolkit(args, seed, ROWS[name], folder, test)
            every.append({"row": name, "seed": seed, "width": args.width, "cpu_s_per_epoch": cpu, "eer": result})
            line = "  ".join(f"@{e}: " + " ".join(f"{s} {v:.4f}" for s, v in r.items()) for e, r in result.items())
            print(f"{name} seed {seed}: {line}  ({cpu:.0f} CPU s/epoch)", flush=True)
    benchlib.publish(__file__, argv, args, every, render, args.out)
    return 0


if __name__ == "__main__":
    cli(main)
