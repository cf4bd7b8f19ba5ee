"""The training run, put together: every training flag, the task's defaults, and `build` (data, model,
optimiser, TrainLoop; resuming when asked) then `fit`.

train.py is its command line; train_hp.py, the search scripts and the benches build runs through it too.
"""

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data_load
import models
from e2e_verification import image_input, pretrained
from e2e_verification.tasks import DIGITS_RECIPE, task_for_args, task_for_model
from e2e_verification.train_loop import SELECTION_SCORERS, TrainConfig, TrainLoop, noam_factor
from losses import HEADS
from models.verifier import PAIR_FEATURES
from utils import (
    UserError,
    check_inputs_outside,
    device_from_args,
    flag_value,
    git_commit,
    make_parser,
    seed_everything,
    str2bool,
    use_deterministic_algorithms,
    write_json,
)


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def epoch_or_last(text):
    """--checkpoint-epoch: an epoch number, or 'last' (the newest checkpoint in --checkpoint-path)."""
    if text == "last":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number or last, got {text}") from None


def at_least(minimum, why):
    """An int flag's parser that refuses values below `minimum`, saying `why`."""

    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} ({why}), got {text}")
        return value

    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


# The training flags, a table per --help group (see utils.add_options); --model, whose help lists the encoders
# registered when the parser is built, is added in build_parser.
DATA_OPTIONS = {
    "--data-path": dict(
        help="training images: CIFAR-10 folder, IDX folder or image-folder tree (default: scikit-learn's digits)"
    ),
    "--valid-data-path": dict(help="validation images (same kinds; CIFAR-10 and IDX use the test split)"),
    "--train-hdf-file": dict(help="training HDF5 from data_prep.py (speech)"),
    "--valid-hdf-file": dict(help="validation HDF5 from data_prep.py (speech)"),
    ("--workers", "--n-workers"): dict(
        dest="workers",
        type=non_negative(int),
        default=None,
        help="data-loader worker processes (default 4; 0 for in-memory images)",
    ),
    "--ncoef": (positive(int), 23, "feature coefficients per frame (default 23)"),
    "--n-frames": (positive(int), 1000, "training crop length in frames (default 1000)"),
    "--samples-per-class": (positive(int), 5, "items of one class per group in a batch (default 5, as the seed)"),
    "--valid-max-items": (positive(int), 3000, "validation items scored all-pairs each epoch (default 3000)"),
    "--classes": dict(
        help="images: train (and by default validate) on these classes only, e.g. 0-4 or 0,2,7; relabelled in order"
    ),
    "--valid-classes": dict(
        help="images: validate (select models) on these classes, e.g. held-out ones (default: --classes)"
    ),
    "--holdout-classes": (
        at_least(2, "validation needs two classes"),
        None,
        "validate on N classes held out of the training data, never trained on: image classes of --data-path (after "
        "--classes) or speakers of --train-hdf-file, drawn with --seed; the classifier covers the others, and "
        "args.json records the held-out names (default off; not with --valid-data-path, --valid-hdf-file or "
        "--valid-classes)",
    ),
    "--test-classes": dict(
        help="digits demo: classes of the final test (default: the held-out ones with --holdout-classes, else "
        "--valid-classes, else --classes, else all)"
    ),
    "--items-per-class": (
        positive(int),
        None,
        "images: train on at most this many items of each class (a seeded draw; default all)",
    ),
    "--skip-bad-images": (
        "image folders: leave out (with a warning) files that do not decode and images of another size than "
        "most, instead of refusing the folder",
    ),
    "--specaug": ("speech: SpecAugment time and frequency masks in training",),
    "--augment": dict(
        choices=data_load.AUGMENTATIONS,
        default="auto",
        help="images: training augmentation, random crop (zero-padded shift) and/or horizontal flip; auto (default) "
        "= the source's own: digits crop; IDX, CIFAR-10 and image folders crop+flip (use none or crop for digits "
        "and glyphs, which a flip turns into other shapes)",
    ),
    "--sampler": dict(
        choices=("balanced", "random"),
        default="balanced",
        help="images: balanced (default) = batches of --samples-per-class items per class, as the research code's "
        "HDF5 loaders; random = shuffled batches of --batch-size items, as a plain DataLoader",
    ),
}

MODEL_OPTIONS = {
    "--softmax": dict(choices=tuple(HEADS), default="softmax", help="classification head"),
    "--margin": (non_negative(float), 0.35, "AM-softmax margin m (default 0.35)"),
    "--scale": (positive(float), 30.0, "AM-softmax scale s (default 30)"),
    "--softmax-scale": (
        positive(float),
        1.0,
        "--softmax softmax: multiply the normalised embedding by this before the linear layer (default 1, the "
        "research code's head, whose logits stay small and learn slowly; e.g. 30)",
    ),
    "--latent-size": (positive(int), 256, "speech: classification projection size"),
    "--hidden-size": (positive(int), 512, "learned-distance MLP width (default 512)"),
    "--n-hidden": (positive(int), 1, "learned-distance hidden layers (default 1)"),
    "--dropout-prob": (float, 0.25, "dropout before the distance output (default 0.25)"),
    "--ndiscriminators": (positive(int), 1, "learned-distance heads, averaged"),
    "--rproj-size": (int, -1, "fixed random projection of each pair (<= 0: off)"),
    "--trainable-rproj": ("train the projection (what the seed code did)",),
    "--pair-features": dict(
        choices=tuple(PAIR_FEATURES),
        default="concat",
        help="how the learned distance sees a pair: concat = [a; b] (research code, default); sym = "
        "[Pa*Pb, |Pa-Pb|] of normalised embeddings, order-invariant; cos = a*cos + b + a symmetric learned "
        "correction g (zero at initialisation: starts as the cosine score)",
    ),
    "--cos-correction-penalty": (
        non_negative(float),
        1e-2,
        "--pair-features cos: weight of the mean squared correction g^2 added to the pair loss (default 1e-2; 0: off)",
    ),
    "--distance-norm": ("L2-normalise embeddings before a concat distance",),
    "--detach-distance": ("the pair loss trains the distance only, not the encoder",),
    "--channels": (positive(int), None, "speech encoders with a width (ECAPA_TDNN: 512 or 1024)"),
    "--width": (positive(int), None, "image resnet: first-stage channels (default 64)"),
    "--final-norm": (
        "image resnet: BN-ReLU after the last stage, as standard pre-activation ResNets (default off: the "
        "research code's ResNet pools the raw last stage)",
    ),
}

OPTIMISATION_OPTIONS = {
    "--batch-size": (
        positive(int),
        64,
        "images per batch; speech: speaker groups of 5 utterances per batch (default 64)",
    ),
    "--valid-batch-size": (positive(int), None, "validation batch size"),
    "--epochs": (positive(int), None, "epochs (default 500; digits demo 20)"),
    "--lr": (
        positive(float),
        None,
        "learning rate (default 0.1 images); with the noam schedule a scale (default 0.001)",
    ),
    "--momentum": (non_negative(float), 0.9, "SGD momentum (default 0.9)"),
    "--l2": (non_negative(float), None, "weight decay (default 5e-4 images, 1e-5 speech)"),
    "--max-gnorm": (non_negative(float), None, "gradient-norm clipping, 0 = off (default off images, 10 speech)"),
    "--lr-schedule": dict(
        choices=("auto", "plateau", "noam"),
        default="auto",
        help="plateau: halve on a validation-EER plateau (images); noam: warmup then 1/sqrt(step) "
        "(speech); auto picks by data",
    ),
    "--warmup": (positive(int), 4000, "noam warmup steps (default 4000)"),
    "--patience": (non_negative(int), 10, "plateau epochs before halving the LR"),
    "--smoothing": (non_negative(float), 0.2, "label smoothing (default 0.2)"),
    "--margin-warmup-epochs": (
        non_negative(int),
        0,
        "raise the softmax margin linearly from 0 to --margin over these epochs (default 0: fixed margin)",
    ),
    "--ablation": ("drop the classification loss (learned distance only)",),
    "--pair-weight": (
        non_negative(float),
        1.0,
        "weight of the learned distance's pair loss beside the classification loss (default 1, the research "
        "code's plain sum; 0: the distance is not trained)",
    ),
    "--amp": ("bf16 autocast (CUDA)",),
    "--compile": ("torch.compile the encoder (off by default)",),
}

RUN_OPTIONS = {
    "--checkpoint-path": dict(help="checkpoint folder (default: current folder)"),
    "--checkpoint-epoch": (
        epoch_or_last,
        None,
        "resume from checkpoint_<N>ep.pt; last: from the newest checkpoint in --checkpoint-path, or start afresh "
        "when it holds none (what a requeued cluster job wants)",
    ),
    "--cp-name": dict(help="fixed checkpoint file name (overwritten each save)"),
    "--save-every": (positive(int), 1, "epochs between checkpoints (default 1)"),
    "--keep-checkpoints": (
        non_negative(int),
        0,
        "keep only the newest N epoch checkpoints besides the best (0 = keep all)",
    ),
    "--select-by": dict(
        choices=SELECTION_SCORERS,
        default=None,
        help="the validation EER that picks the best checkpoint (recorded in every checkpoint, spared by "
        "--keep-checkpoints, kept in a --cp-name file, printed at the end): e2e (learned distance), cos (cosine) or "
        "fus (their fusion). Default e2e, saving also when the cos EER improves, as the research code did; a "
        "resumed run keeps its checkpoint's choice",
    ),
    "--no-cp": ("write no checkpoints",),
    "--logdir": dict(help="TensorBoard folder"),
    "--seed": (int, 1, "random seed (default 1)"),
    "--device": dict(help="cpu, cuda or cuda:N (default cuda when available)"),
    "--cuda": (str2bool, None, "seed spelling: True/False"),
    "--no-cuda": ("seed spelling of --device cpu",),
    "--verbose": (int, 1, "0: quiet, 1: epoch lines and progress bars"),
    "--pretrained-path": dict(
        help="fine-tune: start from this checkpoint's encoder and learned distance (its architecture), new head"
    ),
}


def build_parser(add_help=True, description=None, epilog=None):
    """Every training flag, once; train.py's command line, and train_hp.py and the search scripts through
    `parents=` (extended_parser)."""
    model = {"--model": dict(default=None, help="encoder: " + ", ".join(models.encoder_names())), **MODEL_OPTIONS}
    sections = ("data", DATA_OPTIONS), ("model", model), ("optimisation", OPTIMISATION_OPTIONS), ("run", RUN_OPTIONS)
    return make_parser(description, epilog, *sections, add_help=add_help, fromfile_prefix_chars="@")


def extended_parser(description, epilog):
    """A parser with every training flag (defined once, here) for the scripts that add their own flags."""
    return make_parser(description, epilog, parents=[build_parser(add_help=False)])


def apply_recipe(args, path, typed):
    """Set in `args` each flag of the recipe file `path` (read by train.py's own parser, so with its types and
    checks) that is not among the `typed` flags: a recipe as defaults (the digits demo's)."""
    parser = build_parser()
    tokens = parser.expand_arg_files(["@" + path])
    recipe = parser.parse_args(tokens)
    for action in parser._actions:
        if set(action.option_strings) & set(tokens) and not typed & set(action.option_strings):
            setattr(args, action.dest, getattr(recipe, action.dest))


def resolve_defaults(args, argv):
    """A resolved copy of parsed `args`: the task's defaults filled in, combinations checked.

    `argv` tells which flags were typed (the digits demo overrides only the others). The parsed
    namespace is left as it is; everything after this works from the copy.
    """
    args = argparse.Namespace(**vars(args))
    if args.model is not None and args.model not in models.encoder_names():
        raise UserError(f"unknown --model {args.model}; choose from {', '.join(models.encoder_names())}")
    task = task_for_args(args)
    args.domain = task.name
    check_holdout_flags(args)
    if args.model is not None:
        model_task = task_for_model(args.model)
        if model_task is not task:
            raise UserError(
                f"--model {args.model} is a {model_task.name} model but the data is {task.name} ({task.data_flag})"
            )
    for key, value in task.defaults.items():
        if getattr(args, key) in (None, "auto"):
            setattr(args, key, value)
    typed = {a.split("=")[0] for a in (argv or [])}
    task.resolve(args, typed)
    if getattr(args, "digits", False):
        apply_recipe(args, DIGITS_RECIPE, typed)
    check_output_folders(args)
    if args.pretrained_path:  # the architecture comes from the checkpoint, read (and checked) before any data
        pretrained.adopt_architecture(args, task, typed)
    if not 0 <= args.dropout_prob < 1:
        raise UserError(f"--dropout-prob must be in [0, 1), got {args.dropout_prob}")
    if not 0 <= args.smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if args.cp_name is not None and (os.path.basename(args.cp_name) != args.cp_name or args.cp_name in ("", ".", "..")):
        raise UserError(f"--cp-name must be a file name, not a path (it goes in --checkpoint-path): {args.cp_name}")
    if args.ablation and args.pair_weight == 0:
        raise UserError("--ablation with --pair-weight 0 leaves no loss to train")
    check_batch_holds_two_classes(task, args)
    if args.pair_features != "concat" and args.rproj_size > 0:
        raise UserError("--rproj-size projects the concatenated pair: it needs --pair-features concat")
    if args.test_classes is None and not args.holdout_classes:  # with it the demo tests the held-out classes
        args.test_classes = args.valid_classes or args.classes
    return args


def check_holdout_flags(args):
    """Refuse --holdout-classes beside a flag that names other validation data."""
    if args.holdout_classes is None:
        return
    given = [flag for flag in ("--valid-data-path", "--valid-hdf-file", "--valid-classes") if flag_value(args, flag)]
    if given:
        raise UserError(
            f"--holdout-classes validates on classes held out of the training data; it does not go with "
            f"{' or '.join(given)}"
        )


# The checkpoint folder is filled (checkpoint_<N>ep.pt, args.json, test_scores.txt), pruned (--keep-checkpoints)
# and searched for a run to resume, so it must not hold the checkpoint fine-tuning starts from; neither it nor
# the --logdir may lie inside a data folder (an image folder would read it as one more class).
HELD_INPUTS = ("--pretrained-path",)
DATA_INPUTS = ("--data-path", "--valid-data-path", "--train-hdf-file", "--valid-hdf-file")


def check_output_folders(args):
    """Resolve --checkpoint-path (default: the current folder) and refuse, before any data is read or anything
    written, one that is a file, that (or --logdir) holds the --pretrained-path checkpoint, or that lies inside
    a data folder. A folder of the run's own earlier epochs is fine: resuming continues in it."""
    flag = "--checkpoint-path"
    if args.checkpoint_path is None:
        args.checkpoint_path, flag = os.getcwd(), "--checkpoint-path (default: the current folder)"
    folder = args.checkpoint_path
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder")
    held = {name: flag_value(args, name) for name in HELD_INPUTS}
    data = {name: flag_value(args, name) for name in DATA_INPUTS}
    for out_flag, out in ((flag, folder), ("--logdir", args.logdir)):
        if out:
            check_inputs_outside(out_flag, out, held, data)


def check_batch_holds_two_classes(task, args):
    """Refuse a --batch-size whose batches hold one class group only: every pair in them would be a target
    pair, so the learned distance would never see a non-target one (its EER stays at chance)."""
    if args.sampler == "random":
        if args.batch_size < 2:
            raise UserError("--sampler random needs --batch-size 2 or more to form pairs")
        return
    groups = task.groups_per_batch(args)
    if groups >= 2:
        return
    enough = next(b for b in range(1, 2 * args.samples_per_class + 2) if task.groups_per_batch(_with(args, b)) >= 2)
    raise UserError(
        f"--batch-size {args.batch_size} makes batches of {groups} class ({args.samples_per_class} items, "
        f"--samples-per-class), so the learned distance never sees a non-target pair; use --batch-size {enough} "
        "or more"
    )


def _with(args, batch_size):
    return argparse.Namespace(**{**vars(args), "batch_size": batch_size})


def model_config(args, n_classes, encoder_args):
    return {
        "model": args.model,
        "encoder_args": encoder_args,
        "n_classes": n_classes,
        "softmax": args.softmax,
        "margin": args.margin,
        "scale": args.scale,
        "hidden_size": args.hidden_size,
        "n_hidden": args.n_hidden,
        "dropout_prob": args.dropout_prob,
        "ndiscriminators": args.ndiscriminators,
        "rproj_size": max(args.rproj_size, 0),
        "trainable_rproj": args.trainable_rproj,
        "pair_features": args.pair_features,
        "distance_norm": args.distance_norm,
        "detach_distance": args.detach_distance,
        "softmax_scale": args.softmax_scale,
    }


def make_loaders(args, task, train, valid, device, rank=0, world_size=1):
    """Training batches (class groups, data_load.GroupBatchSampler; or --sampler random), and validation."""
    if args.sampler == "random":
        sampler = data_load.RandomBatchSampler(train.labels, args.batch_size, args.seed, rank, world_size)
    else:
        sampler = data_load.GroupBatchSampler(
            train.labels, args.samples_per_class, task.groups_per_batch(args), args.seed, rank, world_size
        )
    common = {"num_workers": args.workers, "pin_memory": device.type == "cuda"}
    if args.workers > 0:
        common["prefetch_factor"] = 4
    # Training workers start afresh each epoch, seeded from this generator, which TrainLoop re-seeds from
    # (seed, epoch): persistent workers would carry their random state over from the epochs before, and a
    # resumed run would crop differently. (With no workers the items draw from the main process's RNG.)
    generator = torch.Generator() if args.workers > 0 else None
    train_loader = DataLoader(train, batch_sampler=sampler, generator=generator, **common)
    valid_loader = None
    if valid is not None:  # fixed crops: nothing random, so its workers may persist
        valid_loader = DataLoader(
            valid, batch_size=args.valid_batch_size, shuffle=False, persistent_workers=args.workers > 0, **common
        )
    return train_loader, valid_loader


def make_optimizer(args, model):
    """SGD (Nesterov under the noam schedule, as the seed) and its LR scheduler: noam per step or plateau per epoch."""
    opt = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.l2,
        nesterov=args.lr_schedule == "noam" and args.momentum > 0,
    )
    if args.lr_schedule == "noam":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, noam_factor(args.warmup))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=args.patience, threshold=1e-4, min_lr=1e-7
    )
    return opt, sched


def prepare_model(args, task, model, device, world_size=1):
    """Move the model to `device` (in the task's memory format), optionally compile its encoder in place
    (state_dict keys unchanged), and wrap it in DistributedDataParallel when several processes train."""
    memory_format = task.memory_format(device)
    model = model.to(device, memory_format=memory_format) if memory_format else model.to(device)
    if args.compile:
        model.encoder.compile()
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        unused = args.ablation or args.pair_weight == 0  # a loss term left out: its parameters get no gradient
        model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    return model


def init_distributed(args):
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on the CPU.

    Returns (rank, world_size, device): each process uses cuda:LOCAL_RANK, or the CPU; a single
    process gets (0, 1, None) and picks its device as usual.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = device_from_args(args)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    if args.verbose > 0:  # every process, so a log shows that each node and each of its processes joined
        node = os.environ.get("GROUP_RANK", "?")
        print(
            f"process rank {rank} of {world_size}: node rank {node}, local rank {local_rank}, host "
            f"{socket.gethostname()}, backend {backend}, device {device}",
            flush=True,
        )
    return rank, world_size, device


@dataclass
class Run:
    """A training run put together by `build`: everything `fit` and the callers need."""

    args: argparse.Namespace  # the resolved arguments
    task: object
    trainer: TrainLoop
    model: torch.nn.Module
    datasets: tuple
    writer: object = None
    rank: int = 0


def build(args, argv=None, device=None, rank=0, world_size=1, announce=True, datasets=None):
    """Resolve the arguments and build data, model, optimiser and loop (resuming when asked); -> Run.

    `datasets`, when given, replaces the task's (train, valid, n_classes, encoder_args) (benches and
    tests feed data from memory). Nothing is written yet: outputs start in `fit`, once data, model
    and checkpoint all check out.
    """
    args = resolve_defaults(args, argv)
    task = task_for_args(args)
    device = device or device_from_args(args)
    if args.model is None:
        args.model = task.defaults["model"]
    record = {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, type(None)))}
    if rank == 0 and args.verbose > 0 and announce:
        print(f"e2e-verification {git_commit()}  device {device}", flush=True)
        print(json.dumps(record, sort_keys=True), flush=True)
    use_deterministic_algorithms()
    seed_everything(args.seed)
    train, valid, n_classes, encoder_args = datasets or task.datasets(args)
    if valid is not None:
        valid = data_load.validation_subset(valid, args.valid_max_items)
    if args.holdout_classes and valid is not None and datasets is None:
        record_holdout(args, record, valid, rank == 0 and args.verbose > 0)
    config = model_config(args, n_classes, encoder_args)
    config["frontend"] = task.frontend(args)
    config["image_input"] = image_input.record(train)  # how verify.py must scale and normalise image files
    try:
        model = models.build_model(config)
    except TypeError as err:
        raise UserError(f"--model {args.model} does not take these settings: {err}") from None
    if args.pretrained_path:  # fine-tuning: the checkpoint's architecture, encoder and distance; a new head
        typed = {a.split("=")[0] for a in (argv or [])}
        model = pretrained.start_from(args.pretrained_path, config, typed, rank == 0 and args.verbose > 0)
    model = prepare_model(args, task, model, device, world_size)
    train_loader, valid_loader = make_loaders(args, task, train, valid, device, rank, world_size)
    optimizer, scheduler = make_optimizer(args, model)
    cfg = TrainConfig.from_args(args, progress=args.verbose > 0 and sys.stderr.isatty(), record=record)
    trainer = TrainLoop(
        model,
        optimizer,
        scheduler,
        args.lr_schedule,
        train_loader,
        valid_loader,
        device,
        cfg,
        rank=rank,
        crop=task.training_transform(args),
        valid_classes=data_load.validation_classes(train, valid) if valid is not None and datasets is None else None,
    )
    if args.checkpoint_epoch is not None:
        resume(trainer, args.checkpoint_epoch, rank == 0 and args.verbose > 0)
    return Run(args, task, trainer, model, (train, valid), rank=rank)


def record_holdout(args, record, valid, verbose):
    """--holdout-classes: the held-out classes' names (the validation set's classes) into the resolved arguments
    and the run record (args.json, every checkpoint's args), printed once with `verbose`."""
    args.holdout_class_names = record["holdout_class_names"] = data_load.class_names(valid)
    if verbose:
        print(f"held out for validation ({len(valid)} items): {', '.join(args.holdout_class_names)}", flush=True)


def resume(trainer, epoch, verbose):
    """Load checkpoint_<epoch>ep.pt, or for 'last' the newest checkpoint in the folder as rank 0 sees it (every
    rank loads that one file); 'last' with none there starts afresh."""
    if epoch != "last":
        trainer.load(trainer.checkpoint_file(epoch))
        return
    path = trainer.newest_checkpoint()
    if dist.is_initialized() and dist.get_world_size() > 1:  # a node's stale view of a shared folder must not win
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    if path is not None:
        trainer.load(path)
    if verbose:
        where = trainer.cfg.checkpoint_path
        print(f"resuming from {path} (epoch {trainer.epoch})" if path else f"no checkpoint in {where}: starting afresh")


def fit(run):
    """Train a built run to its last epoch; writes args.json, checkpoints and logs (rank 0)."""
    if run.rank == 0:
        try:
            os.makedirs(run.args.checkpoint_path, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot make --checkpoint-path {run.args.checkpoint_path}: {err.strerror}") from None
    if run.rank == 0 and not run.args.no_cp:
        write_json(os.path.join(run.args.checkpoint_path, "args.json"), run.trainer.cfg.record)
    if run.args.logdir and run.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = run.trainer.writer = SummaryWriter(run.args.logdir)
    try:
        run.trainer.fit()
    finally:
        if run.writer is not None:
            run.writer.close()
    return run
