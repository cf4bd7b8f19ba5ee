"""Verify recordings or images with a trained model: do the test items come from the enrolled speaker (or class)?

Wav files (16-bit PCM mono) go through the checkpoint's own front end (resampled to its rate when the
file's differs); image files are decoded with Pillow and scaled and normalised as the training images
were. Several enrollment items form one model: the learned distance scores the test item against each
and its probabilities and logits are averaged; cosine compares with the mean of the normalised
enrollment embeddings. Long recordings are embedded in chunks of --chunk-seconds, averaged.

Prints, per test item, the e2e probability and logit, the cosine and the fused score, and a decision:
at --threshold on the --scorer's score, or, with --calibration, at the Bayes threshold of --p-target on
the scorer's calibrated log-likelihood ratio. With neither, a checkpoint that carries a calibration (train.py
fits one on its validation pairs) decides at that Bayes threshold; an older checkpoint at the e2e threshold.
Also a Python API: Verifier.load(cp).score(enroll, test).
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import json
import math
import numbers
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from e2e_verification.checkpoints import (
    ALLOW_OTHER_MODEL,
    ALLOW_OTHER_MODEL_HELP,
    check_provenance,
    load_model_and_state,
)
from e2e_verification.scoring import fuse
from e2e_verification.tasks import task_for_model
from utils import UserError, add_device_flags, choose_device, cli, device_from_args, make_parser

EXAMPLE = """examples:
  python verify.py --cp-path cp/asterisk/checkpoint_8ep.pt --enroll alice1.wav alice2.wav --test who.wav
  python verify.py --cp-path cp/asterisk/checkpoint_8ep.pt --enroll a.wav --test b.wav c.wav \\
      --calibration cal.json --p-target 0.01 --json"""
COLUMNS = ("e2e", "e2e_logit", "cos", "fus")
DEFAULT_THRESHOLDS = {"e2e": 0.5, "e2e_logit": 0.0, "fus": 0.5}  # cos has no natural one: --threshold is needed
DEFAULT_P_TARGET = 0.01


# ----------------------------------------------------------------------------- the API


class Verifier:
    """A trained model ready to embed files and score them: Verifier.load(cp).score(enroll_paths, test_path)."""

    def __init__(self, model, state, cp_path, device, chunk_seconds=10.0, min_frames=100):
        check_chunking(chunk_seconds, min_frames)
        self.model, self.cp_path, self.device = model, cp_path, device
        self.files = task_for_model(model.config["model"]).file_input(model, state, cp_path, chunk_seconds, min_frames)

    @classmethod
    def load(cls, cp_path, device=None, chunk_seconds=10.0, min_frames=100):
        """The model of checkpoint `cp_path` (weights-only load) on `device` (default cuda when present)."""
        check_chunking(chunk_seconds, min_frames)
        device = device if isinstance(device, torch.device) else choose_device(device)
        model, state = load_model_and_state(cp_path, device=device)
        return cls(model, state, cp_path, device, chunk_seconds, min_frames)

    def inputs(self, path):
        """The model inputs of one file: speech -> list of (n_coef, frames) chunks; image -> [(C, H, W)]."""
        if not os.path.isfile(path):
            raise UserError(f"file not found: {path}")
        return self.files.inputs(path)

    @torch.no_grad()
    def embed_file(self, path):
        """One file's embedding (emb,) float32 on the model's device; a long recording's is the mean of its chunks'.

        An embedding with NaN or infinite values (the model overflowed on this file) is a UserError naming it.
        """
        emb = self.files.embed(self.model, self.inputs(path), self.device).mean(0)
        if not bool(torch.isfinite(emb).all()):
            raise UserError(f"the model gives a non-finite (NaN or infinite) embedding for {path}")
        return emb

    def embed_files(self, paths):
        """(n, emb) embeddings of `paths`, in order."""
        return torch.stack([self.embed_file(p) for p in paths])

    @torch.no_grad()
    def score_embeddings(self, enroll, test):
        """Enrollment embeddings (n, emb) as one model against test embeddings (m, emb) -> {column: (m,) tensor}.

        e2e / e2e_logit: the learned distance's probability / logit (mean over its heads) of each
        (enrollment item, test item) pair, averaged over the enrollment items; cos: cosine with the mean of
        the L2-normalised enrollment embeddings; fus: the fusion of e2e and cos (scoring.fuse).
        Empty, misshapen or non-finite embeddings are a UserError.
        """
        width = self.model.encoder.embedding_size
        check_embeddings(enroll, "enrollment", width)
        check_embeddings(test, "test", width)
        n, m = len(enroll), len(test)
        emb = torch.cat([enroll, test])
        idx_a = torch.arange(n, device=emb.device).repeat(m)
        idx_b = torch.arange(n, n + m, device=emb.device).repeat_interleave(n)
        self.model.distance.eval()
        logits = self.model.distance.pair_logits(emb, idx_a, idx_b).float()  # (heads, m * n)
        e2e = torch.sigmoid(logits).mean(0).view(m, n).mean(1)
        e2e_logit = logits.mean(0).view(m, n).mean(1)
        centre = F.normalize(F.normalize(enroll, dim=1).mean(0), dim=0)
        cos = F.normalize(test, dim=1) @ centre
        return {"e2e": e2e, "e2e_logit": e2e_logit, "cos": cos, "fus": fuse(e2e, cos)}

    def score(self, enroll, test):
        """Scores of one test file against an enrollment (one path or a list of paths) -> {column: float}."""
        enroll = [enroll] if isinstance(enroll, str | os.PathLike) else list(enroll)
        if not enroll:
            raise UserError("give at least one enrollment file")
        scores = self.score_embeddings(self.embed_files(enroll), self.embed_file(test)[None])
        return {name: float(value[0]) for name, value in scores.items()}


def check_chunking(chunk_seconds, min_frames):
    """UserError unless `chunk_seconds` is a finite number >= 0 (0: whole recordings) and `min_frames` an int >= 1."""
    if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, numbers.Real):
        raise UserError(f"chunk seconds must be a number, got {chunk_seconds!r}")
    if not (math.isfinite(chunk_seconds) and chunk_seconds >= 0):
        raise UserError(f"chunk seconds must be >= 0 (0 = whole recordings) and finite, got {chunk_seconds}")
    if isinstance(min_frames, bool) or not isinstance(min_frames, numbers.Integral) or min_frames < 1:
        raise UserError(f"min frames must be an integer >= 1, got {min_frames!r}")


def check_embeddings(emb, what, width):
    """UserError unless `emb` is a (n, width) tensor with n >= 1 and only finite values; `what` names it."""
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[1] != width:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise UserError(f"{what} embeddings must be a (n, {width}) tensor, got {shape}")
    if emb.shape[0] == 0:
        raise UserError(f"no {what} embeddings: give at least one")
    if not bool(torch.isfinite(emb).all()):
        raise UserError(f"{what} embeddings hold non-finite values (NaN or infinite)")


# ----------------------------------------------------------------------------- decisions


def decision_rule(args, calibration):
    """(column deciding, threshold, text saying why) from --scorer, --threshold, --calibration and --p-target.

    --p-target applies only with a calibration (its default, DEFAULT_P_TARGET, is filled in then).
    """
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UserError(f"--threshold must be a finite number, got {args.threshold}")
    if calibration is None:
        if args.p_target is not None:
            raise UserError("--p-target applies only with --calibration (it sets the Bayes threshold of its LLRs)")
        scorer = args.scorer or "e2e"
        if scorer not in COLUMNS:
            raise UserError(f"--scorer must be one of {', '.join(COLUMNS)} (calibrated ones need --calibration)")
        threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS.get(scorer)
        if threshold is None:
            raise UserError(f"--scorer {scorer} has no default threshold: give --threshold")
        return scorer, threshold, f"{scorer} >= {threshold:g}"
    if args.threshold is not None:
        raise UserError(
            "--threshold and --calibration exclude each other: a calibration decides at the Bayes threshold"
        )
    from e2e_verification.calibration import check_p_target  # loaded with the calibration file already

    if args.p_target is None:
        args.p_target = DEFAULT_P_TARGET
    check_p_target(args.p_target, "--p-target")
    offered = [f"cal_{name}" for name in (*calibration["fusions"], *calibration["calibrations"])]
    column = offered[0] if args.scorer is None else f"cal_{args.scorer.removeprefix('cal_')}"
    if column not in offered:
        raise UserError(f"the calibration has no {column}; it offers {', '.join(offered)}")
    threshold = math.log((1.0 - args.p_target) / args.p_target)
    return column, threshold, f"{column} >= {threshold:.3f}, the Bayes threshold at p_target {args.p_target:g}"


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--enroll", nargs="+", required=True, help="enrollment wav or image files (one model together)")
    p.add_argument("--test", nargs="+", required=True, help="test wav or image files, each scored alone")
    p.add_argument(
        "--scorer",
        default=None,
        help="the score that decides: e2e (default), e2e_logit, cos or fus; with --calibration a calibrated "
        "column, e.g. e2e_logit+cos (default: its first fusion, else its first calibration)",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="accept at score >= this (default 0.5 e2e/fus, 0 e2e_logit)"
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="calibration JSON from calibrate.py: decide on LLRs (default: the checkpoint's own calibration, when "
        "train.py fitted one on its validation pairs and neither --threshold nor a raw --scorer is given)",
    )
    p.add_argument(
        "--p-target",
        type=float,
        default=None,
        help=f"with --calibration: target prior of the Bayes threshold (default {DEFAULT_P_TARGET})",
    )
    p.add_argument(ALLOW_OTHER_MODEL, action="store_true", help=ALLOW_OTHER_MODEL_HELP)
    p.add_argument(
        "--chunk-seconds", type=float, default=10.0, help="embed long recordings in chunks this long (0 = whole)"
    )
    p.add_argument("--min-frames", type=int, default=100, help="shorter recordings are tiled to this (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_device_flags(p)
    return p


def main(argv=None):
    from e2e_verification.calibration import apply_calibration, load_calibration, warn_checkpoint_calibration

    args = build_parser().parse_args(argv)
    calibration = load_calibration(args.calibration, COLUMNS) if args.calibration else None
    raw_rule = args.threshold is not None or (args.scorer is not None and not args.scorer.startswith("cal_"))
    if calibration is not None or raw_rule:  # the flags decide: refuse bad ones before loading the model
        column, threshold, rule = decision_rule(args, calibration)
    verifier = Verifier.load(args.cp_path, device_from_args(args), args.chunk_seconds, args.min_frames)
    if calibration is not None:
        what = f"calibration {args.calibration}"
        check_provenance(calibration.get("provenance"), verifier.model, what, allow=args.allow_other_model)
    elif not raw_rule:  # by default, the calibration the checkpoint carries (fitted on its validation pairs)
        calibration = getattr(verifier.model, "calibration", None)
        column, threshold, rule = decision_rule(args, calibration)
        if calibration is not None:
            rule += " (the checkpoint's calibration, fitted on its validation pairs)"
    enroll = verifier.embed_files(args.enroll)
    test = verifier.embed_files(args.test)
    scores = {k: v.cpu().numpy().astype(np.float64) for k, v in verifier.score_embeddings(enroll, test).items()}
    llrs = apply_calibration(calibration, scores) if calibration else {}
    decided = llrs.get(column, scores.get(column))
    results = [
        {
            "test": path,
            "scores": {k: float(v[i]) for k, v in scores.items()},
            "llr": {k: float(v[i]) for k, v in llrs.items()},
            "accept": bool(decided[i] >= threshold),
        }
        for i, path in enumerate(args.test)
    ]
    summary = {"checkpoint": args.cp_path, "enroll": args.enroll, "decision": rule, "column": column}
    summary |= {"threshold": threshold, "p_target": args.p_target if calibration else None, "results": results}
    if calibration is not None and args.calibration is None:  # the checkpoint's, now that the inputs are read
        warn_checkpoint_calibration(calibration)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"enrollment: {', '.join(args.enroll)}; decision: accept when {rule}")
    for result in results:
        values = [f"{k} {v:.4f}" for k, v in (*result["scores"].items(), *result["llr"].items())]
        print(f"{'ACCEPT' if result['accept'] else 'reject'}  {result['test']}  " + "  ".join(values))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    cli(main)
