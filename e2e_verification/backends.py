"""The scorers eval.py adds to scoring.SCORERS from its flags: calibrated LLRs (--calibration), S-norm and
AS-norm against a cohort (--cohort, --cohort-top-n), a PLDA back-end (--plda) and a learned distance trained
on fixed embeddings (--distance, train_distance.py; its file format is here).

Every file a flag names is read and checked when the Backends is built, before the checkpoint or any
embedding, so a bad file fails in a second. `scorers(...)` then returns the full scorer list for the
evaluated items' embeddings; every consumer (score file, JSON, tables, plots) iterates that list.

Each back-end is a `Backend` subclass (its flags, its files, its scorers) listed in BACKENDS; eval.py's
back-end flags and the Backends of a run come from that list alone.
"""

import abc
import functools
import os
from typing import NamedTuple

import numpy as np
import torch

from e2e_verification import embedding_files, score_norm, scoring
from e2e_verification.calibration import PREFIX, apply_calibration, load_calibration
from e2e_verification.checkpoints import check_provenance, load_weights_only
from e2e_verification.scoring import Scorer
from utils import UserError, atomic_path

# Raw scores normalised against the cohort, by the name of the scorer that gives them.
NORMALISED = ("cos", "e2e_logit")


def _calibrated(params, name, block):
    return apply_calibration(params, block)[name]


def calibrated_scorers(params):
    """One LLR scorer per calibration and per fusion of calibration.py's parameters: `cal_<name>`."""
    out = []
    for name, cal in params["calibrations"].items():
        one = {"p_target": params["p_target"], "calibrations": {name: cal}, "fusions": {}}
        help = f"{name} calibrated to an LLR: {cal['a']:.6g} * {name} + {cal['b']:.6g}"
        out.append(Scorer(PREFIX + name, functools.partial(_calibrated, one, PREFIX + name), help, is_llr=True))
    for name, fusion in params["fusions"].items():
        one = {"p_target": params["p_target"], "calibrations": {}, "fusions": {name: fusion}}
        terms = " + ".join(f"{w:.6g} * {col}" for col, w in fusion["weights"].items())
        help = f"linear fusion to an LLR: {terms} + {fusion['bias']:.6g}"
        out.append(Scorer(PREFIX + name, functools.partial(_calibrated, one, PREFIX + name), help, is_llr=True))
    return out


# ----------------------------------------------------------------------------- block scorers for cohorts


def logit_block(distance, amp=False):
    """The learned distance's mean logit over its heads as a block scorer: (a (n, d), b (m, d)) -> (n, m).

    Both sides are projected together and the pairs formed by broadcasting slices, as all-pairs scoring
    does; callers keep n * m * distance.pair_width within memory (see `cohort_chunk`)."""

    def score(a, b):
        projected = distance.project(torch.cat([a, b]))
        n = len(a)
        _, logit = scoring._head_means(distance, projected, (slice(0, n), None), (None, slice(n, None)), amp)
        return logit

    return score


def cohort_chunk(distance, device, cohort_size):
    """Items scored against the cohort per block so that a block holds about one all-pairs block of activations."""
    return max(1, scoring.pair_chunk(distance, device) // cohort_size)


def _normalised(raw, stats, block):
    idx_a, idx_b = block.indices()
    return score_norm.snorm(block[raw], idx_a, idx_b, stats, stats).float()


def normalised_scorers(distance, emb, cohort, top_n, amp=False):
    """S-norm and AS-norm (top_n highest cohort scores) of the cosine and of the e2e logit, for items emb (N, d)
    against cohort (c, d): per-item cohort means and deviations computed here (each item first argument of
    the block scorer), applied per pair. Statistics are kept on the CPU beside the PairTable."""
    distance.eval()
    out = []
    blocks = {
        "cos": (score_norm.cosine_block, None),
        "e2e_logit": (logit_block(distance, amp), cohort_chunk(distance, emb.device, len(cohort))),
    }
    for raw in NORMALISED:
        block, chunk = blocks[raw]
        for prefix, n_top, what in (("snorm", None, "S-norm"), ("asnorm", top_n, f"AS-norm (top {top_n})")):
            with torch.no_grad():
                stats = score_norm.cohort_stats(emb, cohort, block, n_top, chunk)
            stats = tuple(s.cpu() for s in stats)
            help = f"{raw} after {what} against a cohort of {len(cohort)}"
            out.append(Scorer(f"{prefix}_{raw}", functools.partial(_normalised, raw, stats), help))
    return out


def _plda_scores(model, projected, block):
    idx_a, idx_b = (i.numpy() for i in block.indices())
    u, v = projected[idx_a], projected[idx_b]
    return torch.from_numpy(model.score_projected(u, v)).float()


def plda_scorer(model, emb):
    """The PLDA LLR of each pair of items emb (N, d): every item projected once (PLDA.project), pairs scored a
    block at a time (PLDA.score_projected)."""
    projected = model.project(emb.detach().cpu().numpy().astype(np.float64), "evaluated embeddings")
    return Scorer("plda", functools.partial(_plda_scores, model, projected), "two-covariance PLDA LLR", is_llr=True)


# ----------------------------------------------------------------------------- a learned distance on fixed embeddings
#
# train_distance.py's file (torch.save, loaded weights only): {"format": DISTANCE_FORMAT, "config": the
# LearnedDistance keyword arguments (emb_size, hidden_size, n_hidden, dropout_prob, ndiscriminators,
# pair_features, normalize), "weights": its state_dict, "provenance": the model that made the training
# embeddings (checkpoints.provenance_of, None when unknown), "training": what the run did (flags, EERs)}.

DISTANCE_FORMAT = "learned-distance/1"
DISTANCE_CONFIG = (
    "emb_size",
    "hidden_size",
    "n_hidden",
    "dropout_prob",
    "ndiscriminators",
    "pair_features",
    "normalize",
)


def save_distance(path, distance, config, provenance=None, training=None):
    """Write a LearnedDistance built from `config` (DISTANCE_CONFIG keys) as train_distance.py's file, atomically."""
    assert set(config) == set(DISTANCE_CONFIG), sorted(config)
    weights = {name: tensor.detach().cpu() for name, tensor in distance.state_dict().items()}
    state = {"format": DISTANCE_FORMAT, "config": dict(config), "weights": weights, "provenance": provenance}
    state["training"] = training or {}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_distance_state(path):
    """The dict of a distance file, loaded weights only; UserError for anything that is not one."""
    not_one = f"{path} is not a distance file written by train_distance.py"
    state = load_weights_only(path, "distance file", "distance file written by train_distance.py")
    if not isinstance(state, dict):
        raise UserError(not_one)
    if state.get("format") != DISTANCE_FORMAT:
        raise UserError(not_one + (" (a checkpoint? give it as --cp-path)" if "model_state" in state else ""))
    return state


class DistanceFile(NamedTuple):
    distance: torch.nn.Module  # models.verifier.LearnedDistance, in eval mode on the CPU
    config: dict  # its DISTANCE_CONFIG keyword arguments
    provenance: dict | None  # the model that made its training embeddings, None when unknown
    training: dict  # what train_distance.py did: its flags, classes, epochs, held-out EERs


def load_distance(path):
    """The DistanceFile of a file written by save_distance; UserError for a damaged file or an unknown variant."""
    from models.verifier import PAIR_FEATURES, LearnedDistance

    state = _read_distance_state(path)
    config = state.get("config")
    if not isinstance(config, dict) or set(config) != set(DISTANCE_CONFIG):
        raise UserError(f"{path}: its distance configuration is missing or damaged")
    if config["pair_features"] not in PAIR_FEATURES:
        known = ", ".join(PAIR_FEATURES)
        raise UserError(
            f"{path}: unknown learned-distance variant {config['pair_features']!r} (this code knows {known})"
        )
    try:
        distance = LearnedDistance(**config)
        distance.load_state_dict(state.get("weights") or {})
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{path}: its weights do not fit its configuration (damaged file)") from None
    provenance = state.get("provenance")
    provenance = provenance if isinstance(provenance, dict) else None
    return DistanceFile(distance.eval(), config, provenance, state.get("training") or {})


def _distance_scores(distance, projected, amp, block):
    """The mean logit over the heads of a block's pairs, a pair_chunk at a time (bounded activations)."""
    device = distance.heads[0].first.weight.device
    idx_a, idx_b = (i.to(device) for i in block.indices())
    step = scoring.pair_chunk(distance, device)
    out = torch.empty(len(idx_a), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, len(idx_a), step):
            part = slice(start, start + step)
            out[part] = scoring._head_means(distance, projected, idx_a[part], idx_b[part], amp)[1].cpu()
    return out


def distance_scorer(distance, emb, amp=False, name="dist"):
    """Scorer `name`: the learned distance's mean logit of each pair of items emb (N, d), every item projected once."""
    distance.to(emb.device).eval()
    with torch.no_grad():
        projected = distance.project(emb.float())
    help = "the learned distance trained on fixed embeddings (train_distance.py): its logit (mean over the heads)"
    return Scorer(name, functools.partial(_distance_scores, distance, projected, amp), help, is_llr=True)


def distance_fusion_scorer(name="dist_fus", column="dist"):
    """Scorer `name`: the research code's fixed fusion (scoring.fuse) of the back-end distance `column`'s
    probability with the cosine, as `fus` fuses the jointly trained distance's."""
    help = "0.5 * (sigmoid(dist) + 0.5 * (cos + 1)): the fixed fusion of the back-end distance with the cosine"
    return Scorer(name, lambda block: scoring.fuse(torch.sigmoid(block[column].float()), block.cos), help)


# ----------------------------------------------------------------------------- the back-end registry


class Backend(abc.ABC):
    """One eval.py back-end: its flags, the files they name (read and checked in `from_args`, before the checkpoint
    or any embedding) and the scorers it adds. A new back-end is one subclass and one line in BACKENDS."""

    flags = ()  # ((flag, argparse keyword arguments), ...) in --help order
    input_flags = ()  # the flags that name a file or folder eval.py reads (checked against its outputs)
    reads_scores = False  # True when its scorers read other scorers' columns: then it is built and applied last

    @classmethod
    def add_arguments(cls, parser):
        """Add the back-end's flags to eval.py's parser."""
        for flag, kwargs in cls.flags:
            parser.add_argument(flag, **kwargs)

    @classmethod
    @abc.abstractmethod
    def from_args(cls, args, columns):
        """The back-end of eval.py's `args`, its files read and checked, or None when its flags leave it off;
        `columns` = the names of the scorers before it (scoring.SCORERS and the earlier back-ends')."""

    @abc.abstractmethod
    def names(self):
        """The names of the scorers it adds, known before any embedding (a calibration may read them)."""

    @abc.abstractmethod
    def check_model(self, model, allow_other_model):
        """Before any embedding: refuse files made with another model than `model` (their recorded provenance,
        see checkpoints.check_provenance) or of another embedding size."""

    @abc.abstractmethod
    def scorers(self, model, emb, embed_cohort=None, amp=False):
        """Its scorers for the evaluated items' embeddings emb (N, d), in the order of `names()`."""


class Calibration(Backend):
    """--calibration: calibrate.py's calibrated and fused LLRs (`cal_<name>`) of the other scorers' columns."""

    flags = (
        (
            "--calibration",
            {"default": None, "help": "calibration.py JSON: adds its calibrated and fused LLR scorers (cal_*)"},
        ),
    )
    input_flags = ("--calibration",)
    reads_scores = True

    def __init__(self, params, from_checkpoint=False):
        self.params, self.from_checkpoint = params, from_checkpoint

    @classmethod
    def from_args(cls, args, columns):
        return cls(load_calibration(args.calibration, columns=columns)) if args.calibration else None

    def names(self):
        return [PREFIX + name for name in (*self.params["calibrations"], *self.params["fusions"])]

    def check_model(self, model, allow_other_model):
        if not self.from_checkpoint:  # the checkpoint's own calibration was made with its very weights
            check_provenance(self.params.get("provenance"), model, "the --calibration file", allow_other_model)

    def scorers(self, model, emb, embed_cohort=None, amp=False):
        return calibrated_scorers(self.params)


class Cohort(Backend):
    """--cohort, --cohort-top-n: S-norm and AS-norm of cos and e2e_logit against a cohort."""

    flags = (
        (
            "--cohort",
            {
                "default": None,
                "help": "score-normalisation cohort: an embed.py embeddings.h5, or speech features (feats.scp, its "
                "folder, HDF5) / images (a folder) to embed; adds S-norm and AS-norm of cos and e2e_logit",
            },
        ),
        (
            "--cohort-top-n",
            {"type": int, "default": 300, "help": "AS-norm: highest cohort scores kept per item (default 300)"},
        ),
    )
    input_flags = ("--cohort",)

    def __init__(self, path, top_n=300):
        self.path, self.top_n = path, top_n
        self.file = None  # the cohort's Embeddings when it is an embeddings file (read in check_model)

    @classmethod
    def from_args(cls, args, columns):
        if args.cohort is not None and not os.path.exists(args.cohort):
            raise UserError(f"cohort not found: {args.cohort}")
        if args.cohort_top_n < 2:
            raise UserError(f"--cohort-top-n must be >= 2, got {args.cohort_top_n}")
        return cls(args.cohort, args.cohort_top_n) if args.cohort is not None else None

    def names(self):
        return [f"{prefix}_{raw}" for raw in NORMALISED for prefix in ("snorm", "asnorm")]

    def check_model(self, model, allow_other_model):
        """Also reads an embeddings cohort, checking its embedding size."""
        if embedding_files.is_embeddings_file(self.path):
            self.file = embedding_files.read(self.path, "--cohort", model.encoder.embedding_size)
            where = f"the --cohort embeddings {self.path}"
            check_provenance(self.file.provenance, model, where, allow_other_model)

    def embeddings(self, embed_items, device):
        """The cohort's embeddings (c, d) on device: those of the embeddings file, else `embed_items(path)`."""
        if self.file is not None:
            return torch.from_numpy(self.file.vectors).to(device)
        return embed_items(self.path)

    def scorers(self, model, emb, embed_cohort=None, amp=False):
        cohort = self.embeddings(embed_cohort, emb.device)
        if len(cohort) < 2:
            raise UserError(f"cohort {self.path}: score normalisation needs at least 2 items")
        return normalised_scorers(model.distance, emb, cohort, min(self.top_n, len(cohort)), amp)


class Plda(Backend):
    """--plda: the two-covariance PLDA LLR of train_plda.py's model."""

    flags = (("--plda", {"default": None, "help": "PLDA model from train_plda.py: adds the `plda` LLR scorer"}),)
    input_flags = ("--plda",)

    def __init__(self, model):
        self.model = model

    @classmethod
    def from_args(cls, args, columns):
        if args.plda is None:
            return None
        from e2e_verification.plda import PLDA

        if not os.path.isfile(args.plda):
            raise UserError(f"PLDA model not found: {args.plda}")
        return cls(PLDA.load(args.plda))

    def names(self):
        return ["plda"]

    def check_model(self, model, allow_other_model):
        check_provenance(self.model.provenance, model, "the --plda model", allow_other_model)
        size = model.encoder.embedding_size
        if self.model.dim != size:
            raise UserError(f"the PLDA model takes embeddings of size {self.model.dim}; the checkpoint's are {size}")

    def scorers(self, model, emb, embed_cohort=None, amp=False):
        return [plda_scorer(self.model, emb)]


class Distance(Backend):
    """--distance: the logit of a learned distance that train_distance.py trained on fixed embeddings."""

    flags = (
        (
            "--distance",
            {
                "default": None,
                "help": "learned distance from train_distance.py (trained on this model's embeddings): adds the "
                "`dist` scorer, its logit, and `dist_fus`, its fixed fusion with the cosine",
            },
        ),
    )
    input_flags = ("--distance",)

    def __init__(self, distance, config, provenance=None):
        self.distance, self.config, self.provenance = distance, config, provenance

    @classmethod
    def from_args(cls, args, columns):
        if args.distance is None:
            return None
        if not os.path.isfile(args.distance):
            raise UserError(f"distance file not found: {args.distance}")
        found = load_distance(args.distance)
        return cls(found.distance, found.config, found.provenance)

    def names(self):
        return ["dist", "dist_fus"]

    def check_model(self, model, allow_other_model):
        check_provenance(self.provenance, model, "the --distance file", allow_other_model)
        size = model.encoder.embedding_size
        if self.config["emb_size"] != size:
            raise UserError(
                f"the --distance file takes embeddings of size {self.config['emb_size']}; the checkpoint's are {size}"
            )

    def scorers(self, model, emb, embed_cohort=None, amp=False):
        return [distance_scorer(self.distance, emb, amp), distance_fusion_scorer()]


# eval.py's back-ends, in --help order; they are built and applied in this order, except that those that read
# scores (reads_scores) come after the rest.
BACKENDS = (Calibration, Cohort, Plda, Distance)


def add_arguments(parser):
    """Every back-end's flags, in BACKENDS order."""
    for backend in BACKENDS:
        backend.add_arguments(parser)


def input_flags():
    """The flags of every back-end that name a file or folder eval.py reads, in BACKENDS order."""
    return [flag for backend in BACKENDS for flag in backend.input_flags]


class Backends:
    """The back-ends of one eval.py run (see BACKENDS), in the order their scorers are applied."""

    def __init__(self, backends=(), allow_other_model=False):
        self.backends, self.allow_other_model = list(backends), allow_other_model

    @classmethod
    def from_args(cls, args):
        """Build every back-end its flags turn on; each reads and checks its files here."""
        built = []
        for backend in sorted(BACKENDS, key=lambda b: b.reads_scores):
            one = backend.from_args(args, cls(built).raw_names())
            if one is not None:
                built.append(one)
        return cls(built, args.allow_other_model)

    def raw_names(self):
        """Names of the scorers: scoring.SCORERS's, then each back-end's (a calibration built after these may read
        any of them)."""
        return [s.name for s in scoring.SCORERS] + [name for b in self.backends for name in b.names()]

    def adopt_checkpoint_calibration(self, model):
        """With no --calibration: the calibration `model`'s checkpoint carries (fitted on its training run's
        validation pairs by train.py), applied last, as a --calibration file would be; nothing when it has none.
        -> the calibration adopted, or None."""
        params = getattr(model, "calibration", None)
        if params is None or any(isinstance(b, Calibration) for b in self.backends):
            return None
        self.backends.append(Calibration(params, from_checkpoint=True))
        return params

    def check_model(self, model):
        """Before any embedding: each back-end checks its files against `model`, the last applied first (a
        calibration, which reads the others' columns, then the distance, PLDA, then a cohort)."""
        for backend in reversed(self.backends):
            backend.check_model(model, self.allow_other_model)

    def scorers(self, model, emb, embed_cohort=None, amp=False):
        """The scorer list for the evaluated items' embeddings emb (N, d); `embed_cohort(path)` -> (c, d)
        embeds a cohort that is not an embeddings file (the task's own reader)."""
        scorers = list(scoring.SCORERS)
        for backend in self.backends:
            added = backend.scorers(model, emb, embed_cohort, amp)
            assert [s.name for s in added] == backend.names(), (backend, [s.name for s in added])
            scorers += added
        return scorers
