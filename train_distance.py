"""Train a learned distance (models.verifier.LearnedDistance, any --pair-features variant) on fixed embeddings
written by embed.py: a back-end beside PLDA (train_plda.py), scored by eval.py --distance.

Input as train_plda.py takes it: embeddings.h5 (speakers from each vector's `spk` attribute, or from --utt2spk), a
Kaldi embeddings.scp with --utt2spk, or the folder embed.py wrote; with --utt2spk only the utterances it lists are
used. Training is the learned distance's part of train.py: class-balanced batches (groups of --samples-per-class
items of one class, data_load.GroupBatchSampler), every pair of a batch, the default pair loss of
losses.PAIR_LOSSES, Adam or SGD, for --steps batches (or --epochs passes).

Held-out classes choose the weights kept: --valid-classes holds some of the training classes out, or
--valid-embeddings gives embeddings of other classes made by the same model (a development set, e.g. the
validation classes train.py --holdout-classes or --valid-data-path held out of the encoder's training, which
the encoder never saw either). The all-pairs EER of (at most --valid-max-items of) their items is measured
before training and every --valid-every steps, the weights of the best check are kept, and training stops after
--patience checks without a better one; the cosine EER of the same pairs is reported beside it, with how sure
the held-out classes are that the kept distance ranks their pairs better than the cosine: the fraction of
resamples of the classes (with replacement) in which its EER is the lower. For --pair-features cos the
check before training counts too, since the untrained distance is an increasing affine map of the cosine (the
cosine's ranking exactly): that variant keeps its learned correction only when training beat its start on the held-out
classes and they are at least --min-confidence sure it beats the cosine, else it is written as the cosine's
map. Two held-out classes can never be that sure (half their resamples draw one class twice), so with few
held-out classes a cos distance stays the cosine. The
output (torch.save, loaded weights only) holds the distance's configuration and weights and the model that made
the embeddings (their provenance), which eval.py --distance checks against its checkpoint.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import argparse
import itertools
import math
import time

import numpy as np
import torch
from tqdm import tqdm

import data_load
from e2e_verification import backends, scoring
from e2e_verification.checkpoints import check_same_weights
from e2e_verification.embedding_files import input_files, read_labelled, resolve
from e2e_verification.metrics import compute_eer
from e2e_verification.training import MODEL_OPTIONS, OPTIMISATION_OPTIONS, RUN_OPTIONS, non_negative, positive
from losses import DEFAULT_PAIR_LOSS, PAIR_LOSSES, batch_pairs
from models.verifier import LearnedDistance
from utils import UserError, check_outputs, choose_device, cli, make_parser, seed_everything

EXAMPLE = """example:
  python embed.py --data data/train/feats.scp --utt2spk data/train/utt2spk --cp-path cp/checkpoint_10ep.pt \\
      --out-path exp/train_embeddings/ --min-frames 100
  python train_distance.py --embeddings exp/train_embeddings/ --out exp/distance.pt --pair-features sym \\
      --valid-classes 0.1
  python train_distance.py --embeddings exp/train_embeddings/ --valid-embeddings exp/dev_embeddings/ \\
      --out exp/distance.pt --pair-features auto   # dev: other speakers, embedded by the same checkpoint
  python eval.py --test-data test/feats.scp --trials-path test/trials --cp-path cp/checkpoint_10ep.pt \\
      --distance exp/distance.pt --out-path results/scores.out"""

DEFAULT_STEPS = 2000  # about half a minute of one CPU core at the default sizes (batch 64, hidden 512)
LOGIT = next(s for s in scoring.SCORERS if s.name == "e2e_logit")  # what held-out classes are scored with
COSINE = next(s for s in scoring.SCORERS if s.name == "cos")  # and the cosine it is compared with
CONFIDENCE_DRAWS = 1000  # resamples of the held-out classes behind --min-confidence
AUTO = "auto"  # --pair-features auto: train these, keep the one the held-out classes choose
AUTO_VARIANTS = ("sym", "cos")
CHOICE_KEYS = ("valid_eer", "valid_cos_eer", "valid_confidence", "best_step", "seconds")


def fraction(text):
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def count_or_fraction(text):
    """An argparse type: a class count (an integer >= 1), a fraction (0 < f < 1), or 0 for none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if value < 0 or (value >= 1 and not value.is_integer()) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected 0, a fraction in (0, 1) or a whole count, got {text}")
    return value if value < 1 else int(value)


DATA = {
    "--embeddings": dict(required=True, help="embeddings.h5 or embeddings.scp, or the folder holding them"),
    "--utt2spk": dict(default=None, help="Kaldi utt2spk: speaker (class) labels; only these utterances are used"),
    "--out": dict(required=True, help="output distance file (torch.save, loaded weights only), e.g. distance.pt"),
}
MODEL = {}
MODEL["--pair-features"] = dict(
    MODEL_OPTIONS["--pair-features"],
    choices=(*MODEL_OPTIONS["--pair-features"]["choices"], "auto"),
    help=MODEL_OPTIONS["--pair-features"]["help"] + "; auto = train sym and cos and keep the one the held-out "
    "classes choose (the lowest held-out EER of those at least --min-confidence sure to beat the cosine; else "
    "the cos distance, then the cosine's affine map)",
)
MODEL.update(
    {flag: MODEL_OPTIONS[flag] for flag in ("--hidden-size", "--n-hidden", "--dropout-prob", "--ndiscriminators")}
)
MODEL["--distance-norm"] = MODEL_OPTIONS["--distance-norm"]
TRAINING = {
    "--steps": (positive(int), None, f"batches trained on (default {DEFAULT_STEPS})"),
    "--epochs": (positive(int), None, "passes over the training items instead of --steps (default: --steps)"),
    "--batch-size": (positive(int), 64, "items per batch, in groups of --samples-per-class (default 64, as train.py)"),
    "--samples-per-class": (positive(int), 5, "items of one class per group in a batch (default 5, as train.py)"),
    "--optimizer": dict(choices=("adam", "sgd"), default="adam", help="adam (default) or sgd with --momentum"),
    "--lr": (positive(float), None, "learning rate (default 0.001 adam, 0.01 sgd)"),
    "--momentum": OPTIMISATION_OPTIONS["--momentum"],
    "--l2": (non_negative(float), 0.0, "weight decay (default 0)"),
    "--smoothing": (non_negative(float), 0.2, "noise of the pair loss's soft targets, as train.py's (default 0.2)"),
    "--valid-classes": (
        count_or_fraction,
        0,
        "hold out this many classes (>= 1), or this fraction of them (0 < f < 1), for early stopping and the "
        "choice of the step by their EER (default 0: none; the last step is kept)",
    ),
    "--valid-embeddings": (
        str,
        None,
        "embeddings of held-out classes, made by the same model (embeddings.h5 / .scp or their folder), instead "
        "of --valid-classes: a development set for early stopping and the choice of the step",
    ),
    "--valid-utt2spk": (str, None, "Kaldi utt2spk of --valid-embeddings (needed for an scp)"),
    "--min-confidence": (
        fraction,
        0.95,
        "a cos distance keeps its trained correction only when it has a lower EER than the cosine in at least "
        "this fraction of resamples of the held-out classes (default 0.95; 0 keeps the best check); other "
        "variants report the fraction",
    ),
    "--valid-max-items": (positive(int), 500, "held-out items scored all-pairs at each check (default 500)"),
    "--valid-every": (positive(int), 250, "steps between checks of the held-out EER and the loss (default 250)"),
    "--patience": (non_negative(int), 4, "checks without a better held-out EER before stopping (default 4; 0: none)"),
    "--seed": RUN_OPTIONS["--seed"],
    "--device": RUN_OPTIONS["--device"],
}


def build_parser():
    return make_parser(__doc__, EXAMPLE, DATA, ("learned distance", MODEL), ("training", TRAINING))


def check_args(args):
    """One line for flag values that cannot train (before any reading)."""
    if args.epochs and args.steps:
        raise UserError("give --steps or --epochs, not both")
    if not 0 <= args.smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if not 0 <= args.dropout_prob < 1:
        raise UserError(f"--dropout-prob must be in [0, 1), got {args.dropout_prob}")
    if args.batch_size < 2 * args.samples_per_class:
        raise UserError(
            f"--batch-size {args.batch_size} holds fewer than two groups of --samples-per-class "
            f"{args.samples_per_class}: a batch would have no pair of different classes"
        )
    if args.valid_embeddings and args.valid_classes:
        raise UserError("give --valid-classes or --valid-embeddings, not both")
    if args.valid_utt2spk and not args.valid_embeddings:
        raise UserError("--valid-utt2spk labels --valid-embeddings; give both")


def split_classes(labels, valid, seed):
    """(training mask, held-out mask) over items (N,): `valid` classes (a count, or a fraction) drawn with `seed`
    (data_load.draw_holdout, the draw of train.py --holdout-classes)."""
    n_valid = round(valid * len(np.unique(labels))) if isinstance(valid, float) else valid
    if valid and n_valid < 2:
        raise UserError(f"--valid-classes {valid}: {n_valid} classes held out; validation needs at least 2")
    held = data_load.draw_holdout(labels, n_valid, seed, flag=f"--valid-classes {valid}") if valid else []
    valid_mask = np.isin(labels, held)
    return ~valid_mask, valid_mask


def check_classes(labels, group, path):
    """UserError unless at least 2 classes have `group` or more items (each batch needs two such groups)."""
    classes, counts = np.unique(labels, return_counts=True)
    if (counts >= group).sum() < 2:
        raise UserError(
            f"{path}: fewer than 2 training classes have --samples-per-class {group} or more items "
            f"(most items of a class: {counts.max()})"
        )


def held_out_items(n_items, max_items, seed):
    """Indices of at most `max_items` of `n_items` held-out items (a seeded draw, in file order)."""
    order = np.random.default_rng([seed, 1]).permutation(n_items)
    return np.sort(order[:max_items])


def held_out_eer(distance, emb, labels, scorers=(LOGIT,)):
    """{scorer: EER} over all pairs of emb (N, d) with classes labels (N,): the learned distance's logit (and
    the cosine, when asked)."""
    scores, same = scoring.score_all_pairs(distance, emb, labels, scorers=scorers)
    if not same.any() or same.all():
        raise UserError(
            "the held-out items hold no two of one class, or no two of different classes; raise --valid-max-items "
            "or give more held-out classes"
        )
    return {name: float(compute_eer(values, same)) for name, values in scores.items()}


def weighted_eer(same, weights):
    """EER of pairs sorted by ascending score (their target flags `same`) when each pair counts `weights` times;
    NaN when the weights leave no target or no non-target."""
    targets = np.where(same, weights, 0.0)
    nontargets = weights - targets
    n_t, n_n = targets.sum(), nontargets.sum()
    if n_t <= 0 or n_n <= 0:
        return math.nan
    miss = np.cumsum(targets) / n_t  # targets at or below each threshold
    false_alarm = 1.0 - np.cumsum(nontargets) / n_n
    k = np.argmin(np.abs(miss - false_alarm))
    return float(miss[k] + false_alarm[k]) / 2


def beats_cosine(distance, emb, labels, draws, seed):
    """How sure the held-out classes are that the distance ranks their pairs better than the cosine: the fraction
    of `draws` resamples of the classes (drawn with replacement, a class drawn k times weighing its pairs k times
    and its pairs with another class k * k' times) in which the logit's EER is below the cosine's. A resample
    without a target or a non-target counts as no win: two held-out classes can never make it sure."""
    scores, same = scoring.score_all_pairs(distance, emb, labels, scorers=(LOGIT, COSINE))
    same = same.cpu().numpy()
    a, b = torch.triu_indices(len(emb), len(emb), 1)  # score_all_pairs' pair order
    _, cls = np.unique(labels.cpu().numpy(), return_inverse=True)
    class_a, class_b = cls[a.numpy()], cls[b.numpy()]
    orders = [np.argsort(scores[s.name].cpu().numpy(), kind="stable") for s in (LOGIT, COSINE)]
    rng = np.random.default_rng([seed, 2])
    n_classes, wins = cls.max() + 1, 0
    for _ in range(draws):
        times = np.bincount(rng.integers(0, n_classes, n_classes), minlength=n_classes).astype(np.float64)
        weights = np.where(same, times[class_a], times[class_a] * times[class_b])
        mine, cosine = (weighted_eer(same[order], weights[order]) for order in orders)
        wins += bool(mine < cosine)  # False when either is NaN
    return wins / draws


def held_out_set(args, x, y, valid_mask, class_of, provenance, device):
    """(emb, labels) tensors of at most --valid-max-items held-out items, or None: the --valid-classes items of
    the training file (valid_mask), or the items of --valid-embeddings (labels after the training classes',
    refused when a class is also a training class or the file records another model)."""
    if args.valid_embeddings:
        source = resolve(args.valid_embeddings, "--valid-embeddings")
        vectors, speakers, theirs = read_labelled(source, args.valid_utt2spk)
        named = (provenance or {}).get("checkpoint")
        model = f"the model of --embeddings ({named})" if named else "the model of --embeddings"
        check_same_weights(theirs, provenance, source, model, override=None)  # held-out: the same encoder only
        if vectors.shape[1] != x.shape[1]:
            raise UserError(
                f"{source}: embeddings of {vectors.shape[1]} dimensions, the training ones have {x.shape[1]}"
            )
        shared = sorted(set(speakers) & set(class_of))
        if shared:
            raise UserError(
                f"{source}: {len(shared)} of its classes are training classes too (the first: {shared[0]}); "
                "held-out classes must be others"
            )
        names, labels = np.unique(speakers, return_inverse=True)
        if len(names) < 2:
            raise UserError(f"{source}: every embedding is of one class; held-out pairs need at least 2 classes")
        keep = held_out_items(len(vectors), args.valid_max_items, args.seed)
        return torch.from_numpy(vectors[keep]).to(device), torch.from_numpy(labels[keep] + len(class_of)).to(device)
    if not valid_mask.any():
        return None
    keep = np.flatnonzero(valid_mask)[held_out_items(valid_mask.sum(), args.valid_max_items, args.seed)]
    return x[keep], y[keep]


def make_optimizer(distance, args):
    """Adam or SGD (with --momentum) at --lr (default by optimiser) and --l2 weight decay."""
    if args.optimizer == "adam":
        return torch.optim.Adam(distance.parameters(), lr=args.lr or 1e-3, weight_decay=args.l2)
    return torch.optim.SGD(distance.parameters(), lr=args.lr or 1e-2, momentum=args.momentum, weight_decay=args.l2)


def train_step(distance, optimizer, emb, labels, smoothing):
    """One step of the pair loss on all pairs of a batch emb (B, d) with labels (B,); returns the loss."""
    idx_a, idx_b, same = batch_pairs(labels)
    loss = PAIR_LOSSES[DEFAULT_PAIR_LOSS](distance.pair_logits(emb, idx_a, idx_b).float(), same, smoothing)
    if not torch.isfinite(loss):
        raise UserError(f"the pair loss became {loss.item()}; try a lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def batches(sampler):
    """(epoch, batch indices) of successive epochs, without end."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for batch in sampler:
            yield epoch, batch


def train(distance, emb, labels, args, valid=None):
    """Train `distance` on emb (N, d) with int labels (N,) (tensors on one device) for --steps batches (or
    --epochs passes), with a check every --valid-every steps and at the end; `valid` = (emb, labels) of held-out
    classes, whose EER at the checks (for cos also at the check before training, step 0) picks the weights kept
    (and stops the run after --patience checks without a better one). Returns the run's record (the checks,
    steps, the best check's EER, the held-out cosine EER and how sure the classes are the distance beats it)."""
    groups = args.batch_size // args.samples_per_class
    sampler = data_load.GroupBatchSampler(labels.cpu().numpy(), args.samples_per_class, groups, args.seed)
    optimizer = make_optimizer(distance, args)
    total = args.epochs * len(sampler) if args.epochs else args.steps or DEFAULT_STEPS
    history, losses, best = [], [], {"eer": math.inf, "check": 0, "state": None}
    out = {}

    def check(record, eligible=True):
        """Score the held-out pairs at this check and keep the weights when they are the best so far (and
        `eligible`)."""
        if valid is not None:
            record["valid_eer"] = held_out_eer(distance, *valid)[LOGIT.name]
            distance.train()
            if eligible and record["valid_eer"] < best["eer"]:
                state = {k: v.detach().clone() for k, v in distance.state_dict().items()}
                best.update(eer=record["valid_eer"], check=len(history) + 1, state=state)
        history.append(record)
        tqdm.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    start = {k: v.detach().clone() for k, v in distance.state_dict().items()}
    if valid is not None:
        out["valid_cos_eer"] = held_out_eer(distance, *valid, scorers=(COSINE,))[COSINE.name]
        # the untrained cos distance is the cosine's affine map, a start worth keeping; the others' is random
        check({"step": 0, "epoch": 0}, eligible=distance.pair_features == "cos")
    distance.train()
    bar = tqdm(total=total, desc="training the distance", unit="step", disable=None, leave=False)
    for step, (epoch, batch) in enumerate(itertools.islice(batches(sampler), total), 1):
        losses.append(train_step(distance, optimizer, emb[batch], labels[batch], args.smoothing))
        bar.update()
        if step % args.valid_every and step < total:
            continue
        check({"step": step, "epoch": epoch + 1, "loss": float(np.mean(losses))})
        losses = []
        if valid is not None and args.patience and len(history) - best["check"] >= args.patience:
            break
    bar.close()
    if best["state"] is not None:
        distance.load_state_dict(best["state"])
    out.update(history=history, steps=history[-1]["step"], epochs=history[-1]["epoch"])
    if valid is None:
        return out
    out.update(valid_eer=best["eer"], best_step=history[best["check"] - 1]["step"])
    out["valid_confidence"] = beats_cosine(distance, *valid, CONFIDENCE_DRAWS, args.seed)
    if distance.pair_features == "cos" and out["best_step"] and out["valid_confidence"] < args.min_confidence:
        distance.load_state_dict(start)  # not sure enough: back to the cosine's affine map
        out.update(valid_eer=history[0]["valid_eer"], best_step=0, fell_back=True)
    return out


def distance_config(args, emb_size, pair_features):
    """The LearnedDistance keyword arguments of the run (backends.DISTANCE_CONFIG)."""
    return {
        "emb_size": int(emb_size),
        "hidden_size": args.hidden_size,
        "n_hidden": args.n_hidden,
        "dropout_prob": args.dropout_prob,
        "ndiscriminators": args.ndiscriminators,
        "pair_features": pair_features,
        "normalize": args.distance_norm,
    }


def held_out_choice(records, min_confidence):
    """Of {variant: training record} (each with its held-out EER, the cosine's and how sure the classes are), the
    variant the held-out classes choose: among those at least `min_confidence` sure to beat the cosine and below
    it, the one of the lowest held-out EER (ties: the first); None when there is none (the cosine stays best)."""
    sure = [
        (record["valid_eer"], variant)
        for variant, record in records.items()
        if record.get("valid_confidence", 0.0) >= min_confidence and record["valid_eer"] < record["valid_cos_eer"]
    ]
    return min(sure, key=lambda item: item[0])[1] if sure else None


def describe(variant, record, args):
    """The line printed for one trained distance."""
    text = f"{variant} distance, {record['steps']} steps in {record['seconds']:.1f} s"
    if "valid_eer" not in record:
        return text
    text += f", held-out EER {record['valid_eer']:.4f} at step {record['best_step']}"
    sure = f"{100 * record['valid_confidence']:.0f}% of {CONFIDENCE_DRAWS} resamples of the held-out classes"
    text += f" (cosine {record['valid_cos_eer']:.4f}; the distance below it in {sure})"
    if record.get("fell_back"):
        text += f"; under --min-confidence {args.min_confidence}, the untrained distance (the cosine) is kept"
    elif record["best_step"] == 0:
        text += "; training never beat the untrained distance there, which is kept"
    return text


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    source, inputs = input_files(args.embeddings)
    if args.valid_embeddings:
        inputs.update(input_files(args.valid_embeddings, "--valid-embeddings")[1])
    inputs.update({"--utt2spk": args.utt2spk, "--valid-utt2spk": args.valid_utt2spk})
    check_outputs({"--out": args.out}, inputs)
    device = choose_device(args.device)
    vectors, speakers, provenance = read_labelled(source, args.utt2spk)
    names, labels = np.unique(speakers, return_inverse=True)
    if len(names) < 2:
        raise UserError(f"{source}: every embedding is of one class ({names[0]}); a distance needs at least 2")
    train_mask, valid_mask = split_classes(labels, args.valid_classes, args.seed)
    check_classes(speakers[train_mask], args.samples_per_class, source)
    print(f"{len(vectors)} embeddings of {vectors.shape[1]} dimensions from {len(names)} classes", end="")
    print(f", {len(np.unique(labels[valid_mask]))} held out" if valid_mask.any() else "")
    x, y = torch.from_numpy(vectors).to(device), torch.from_numpy(labels).to(device)
    valid = held_out_set(args, x, y, valid_mask, names, provenance, device)
    if args.pair_features == AUTO and valid is None:
        raise UserError(
            f"--pair-features {AUTO} chooses on held-out classes: give --valid-embeddings or --valid-classes"
        )
    trained = {}
    for variant in AUTO_VARIANTS if args.pair_features == AUTO else (args.pair_features,):
        seed_everything(args.seed)  # each variant starts from the same draws
        config = distance_config(args, vectors.shape[1], variant)
        distance = LearnedDistance(**config).to(device)
        start = time.perf_counter()
        record = train(distance, x[train_mask], y[train_mask], args, valid)
        record.update(seconds=round(time.perf_counter() - start, 3), classes=len(names), items=len(vectors))
        trained[variant] = (distance, config, record)
        print(describe(variant, record, args))
    chosen = args.pair_features
    if args.pair_features == AUTO:
        # no variant surely better than the cosine: the cos distance, which is then the cosine's affine map
        chosen = held_out_choice({v: r for v, (_, _, r) in trained.items()}, args.min_confidence) or "cos"
    distance, config, record = trained[chosen]
    record["args"] = dict(vars(args))
    if args.pair_features == AUTO:
        record["candidates"] = {v: {k: r[k] for k in CHOICE_KEYS} for v, (_, _, r) in trained.items()}
    backends.save_distance(args.out, distance, config, provenance, record)
    print(f"{'the held-out choice: ' if args.pair_features == AUTO else ''}{chosen} distance: wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli(main)
