"""Shared helpers: user errors, atomic outputs, devices, seeding, checkpoints and verification metrics."""

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import torch

CHECKPOINT_FORMAT = 1


class UserError(Exception):
    """An error the user caused (a path, a format, a flag value); printed as one line, no traceback."""


def cli(main, argv=None):
    """Run `main(argv)` as a command: a UserError becomes one line on stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as err:
        prog = os.path.basename(sys.argv[0]) or "e2e"
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` on success, delete it on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open a temporary file beside `path` for writing; it replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


# ----------------------------------------------------------------------------- devices and seeds


def choose_device(name=None, cuda_flag=None):
    """Pick the torch device: `name` if given, else cuda when present; `cuda_flag=False` forces the CPU."""
    if cuda_flag is False and name is None:
        return torch.device("cpu")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"bad --device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine")
    return device


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def str2bool(text):
    """Strict true/false parser for flags such as the seed's `--cuda True`."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", "none"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def git_commit():
    """The git commit of this code, or 'unknown' outside a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically (temporary name in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with `weights_only=True`; anything else (a pickle payload) is refused."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {path} safely (weights only): {first}") from None
    if not isinstance(state, dict) or "model_state" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a checkpoint written by this toolkit")
    return state


# ----------------------------------------------------------------------------- metrics


def _as_tensor(values, dtype=None):
    """A detached tensor from an array or tensor; float scores keep their precision, others become float64."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        return values.to(dtype) if dtype is not None else values
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def roc_points(scores, labels):
    """Miss and false-alarm rates at every distinct threshold, from one sort.

    Returns (fnr, fpr) as float64 tensors of length T+1 (T distinct scores), ordered from the
    threshold above every score (nothing accepted: fnr=1, fpr=0) down to the lowest score
    (everything accepted: fnr=0, fpr=1). Tied scores form a single point.
    """
    scores = _as_tensor(scores).reshape(-1)
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)
    labels = _as_tensor(labels, torch.bool).reshape(-1).to(scores.device)
    if scores.numel() != labels.numel():
        raise ValueError("scores and labels differ in length")
    n_tar = int(labels.sum())
    n_non = labels.numel() - n_tar
    if n_tar == 0 or n_non == 0:
        raise ValueError("metrics need at least one target and one non-target trial")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    sorted_scores, order = torch.sort(scores, descending=True)
    sorted_labels = labels[order]
    tp = torch.cumsum(sorted_labels, 0, dtype=torch.float64)
    fp = torch.arange(1, scores.numel() + 1, device=scores.device, dtype=torch.float64) - tp
    # Keep only the last position of every run of tied scores.
    last = torch.ones_like(sorted_labels)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    tp, fp = tp[last], fp[last]
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    fnr = torch.cat([zero + 1.0, 1.0 - tp / n_tar])
    fpr = torch.cat([zero, fp / n_non])
    return fnr, fpr


def _eer_from_points(fnr, fpr):
    idx = torch.argmin(torch.abs(fnr - fpr))
    return float((fnr[idx] + fpr[idx]) / 2)


def _mindcf_from_points(fnr, fpr, p_target, c_miss, c_fa):
    dcf = c_miss * p_target * fnr + c_fa * (1.0 - p_target) * fpr
    c_default = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(dcf.min() / c_default)


def _auc_from_points(fnr, fpr):
    tpr = 1.0 - fnr
    return float(torch.trapezoid(tpr, fpr))


def compute_eer(scores, labels):
    """Equal error rate in [0, 1]: the ROC point where miss and false-alarm rates are closest, averaged.

    `scores`: higher means more likely target; `labels`: 1 target, 0 non-target (arrays or tensors).
    """
    return _eer_from_points(*roc_points(scores, labels))


def compute_mindcf(scores, labels, p_target=0.01, c_miss=1, c_fa=1):
    """Normalised minimum detection cost (NIST/Kaldi definition) over all thresholds."""
    return _mindcf_from_points(*roc_points(scores, labels), p_target, c_miss, c_fa)


def compute_auc(scores, labels):
    """Area under the ROC curve, ties counted as half."""
    return _auc_from_points(*roc_points(scores, labels))


def compute_metrics(scores, labels, p_targets=(0.01, 0.05), c_miss=1, c_fa=1):
    """EER, minDCF at each p_target and AUC from one sort; works on CPU or CUDA tensors."""
    fnr, fpr = roc_points(scores, labels)
    out = {"eer": _eer_from_points(fnr, fpr)}
    for p in p_targets:
        out[f"mindcf_{p:g}"] = _mindcf_from_points(fnr, fpr, p, c_miss, c_fa)
    out["auc"] = _auc_from_points(fnr, fpr)
    return out


def format_metrics_table(results):
    """Render {scorer: metrics} as an aligned text table (one row per scorer)."""
    names = list(next(iter(results.values())).keys())
    header = f"{'scorer':<8}" + "".join(f"{n:>14}" for n in names)
    rows = [header]
    for scorer, metrics in results.items():
        rows.append(f"{scorer:<8}" + "".join(f"{metrics[n]:>14.4f}" for n in names))
    return "\n".join(rows)
