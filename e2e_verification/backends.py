"""The scorers eval.py adds to scoring.SCORERS from its flags: calibrated LLRs (--calibration), S-norm and
AS-norm against a cohort (--cohort, --cohort-top-n), and a PLDA back-end (--plda).

Every file a flag names is read and checked when the Backends is built, before the checkpoint or any
embedding, so a bad file fails in a second. `scorers(...)` then returns the full scorer list for the
evaluated items' embeddings; every consumer (score file, JSON, tables, plots) iterates that list.
"""

import functools
import os

import numpy as np
import torch

from e2e_verification import embedding_files, score_norm, scoring
from e2e_verification.calibration import PREFIX, apply_calibration, load_calibration
from e2e_verification.checkpoints import check_provenance
from e2e_verification.scoring import Scorer
from utils import UserError

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


class Backends:
    """The extra scorers of one eval.py run, from its flags (see build_parser in eval.py)."""

    def __init__(self, calibration=None, cohort=None, top_n=300, plda=None, allow_other_model=False):
        self.cohort_path, self.top_n, self.allow_other_model = cohort, top_n, allow_other_model
        self.cohort_file = None  # the cohort's Embeddings when it is an embeddings file (read in check_model)
        if cohort is not None and not os.path.exists(cohort):
            raise UserError(f"cohort not found: {cohort}")
        if top_n < 2:
            raise UserError(f"--cohort-top-n must be >= 2, got {top_n}")
        self.plda = None
        if plda is not None:
            from e2e_verification.plda import PLDA

            if not os.path.isfile(plda):
                raise UserError(f"PLDA model not found: {plda}")
            self.plda = PLDA.load(plda)
        self.calibration = load_calibration(calibration, columns=self.raw_names()) if calibration else None

    @classmethod
    def from_args(cls, args):
        return cls(args.calibration, args.cohort, args.cohort_top_n, args.plda, args.allow_other_model)

    def raw_names(self):
        """Names of the scorers before calibration (a calibration may read any of them)."""
        names = [s.name for s in scoring.SCORERS]
        if self.cohort_path is not None:
            names += [f"{prefix}_{raw}" for raw in NORMALISED for prefix in ("snorm", "asnorm")]
        if self.plda is not None:
            names.append("plda")
        return names

    def check_model(self, model):
        """Before any embedding: refuse back-end files made with another model than `model` (their recorded
        provenance, see checkpoints.check_provenance) or of another embedding size; read an embeddings cohort."""
        size = model.encoder.embedding_size
        if self.calibration is not None:
            where = "the --calibration file"
            check_provenance(self.calibration.get("provenance"), model, where, self.allow_other_model)
        if self.plda is not None:
            check_provenance(self.plda.provenance, model, "the --plda model", self.allow_other_model)
            if self.plda.dim != size:
                raise UserError(f"the PLDA model takes embeddings of size {self.plda.dim}; the checkpoint's are {size}")
        if self.cohort_path is not None and embedding_files.is_embeddings_file(self.cohort_path):
            self.cohort_file = embedding_files.read(self.cohort_path, "--cohort", size)
            where = f"the --cohort embeddings {self.cohort_path}"
            check_provenance(self.cohort_file.provenance, model, where, self.allow_other_model)

    def cohort_embeddings(self, embed_items, device):
        """The cohort's embeddings (c, d) on device: those of the embeddings file, else `embed_items(path)`."""
        if self.cohort_file is not None:
            return torch.from_numpy(self.cohort_file.vectors).to(device)
        return embed_items(self.cohort_path)

    def scorers(self, model, emb, embed_cohort=None, amp=False):
        """The scorer list for the evaluated items' embeddings emb (N, d); `embed_cohort(path)` -> (c, d)
        embeds a cohort that is not an embeddings file (the task's own reader)."""
        scorers = list(scoring.SCORERS)
        if self.cohort_path is not None:
            cohort = self.cohort_embeddings(embed_cohort, emb.device)
            if len(cohort) < 2:
                raise UserError(f"cohort {self.cohort_path}: score normalisation needs at least 2 items")
            top_n = min(self.top_n, len(cohort))
            scorers += normalised_scorers(model.distance, emb, cohort, top_n, amp)
        if self.plda is not None:
            scorers.append(plda_scorer(self.plda, emb))
        if self.calibration is not None:
            scorers += calibrated_scorers(self.calibration)
        return scorers
