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
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)
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


def _metric_inputs(scores, labels):
    """Flat float scores and bool labels: numpy arrays, or tensors on the scores' device when that is a GPU.

    float16/bfloat16 scores become float32 and integer ones float64 (both exact).
    """
    on_gpu = isinstance(scores, torch.Tensor) and scores.device.type != "cpu"
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().reshape(-1)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        elif not scores.is_floating_point():
            scores = scores.double()
        if not on_gpu:
            scores = scores.numpy()
    else:
        scores = np.asarray(scores).reshape(-1)
        if scores.dtype not in (np.float32, np.float64):
            scores = scores.astype(np.float64)
    if on_gpu:
        labels = torch.as_tensor(labels, device=scores.device).reshape(-1).bool()
    else:
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        labels = labels.reshape(-1).astype(bool, copy=False)
    if scores.shape[0] != labels.shape[0]:
        raise ValueError("scores and labels differ in length")
    return scores, labels


def _sorted_float32(scores, labels):
    """One value sort of float32 scores carrying their labels: -> sorted labels (n,), new-score flags (n-1,).

    The float's sign-magnitude bits become a two's-complement int (so the order is the float order and
    -0.0 meets +0.0), shifted left to hold the label in the lowest bit; sorting these int64 keys is far
    faster than an argsort. Flag i is True where sorted score i+1 differs from score i.
    """
    bits = scores.view(np.int32)
    sign = bits >> 31
    keys = (((bits & 0x7FFFFFFF) ^ sign) - sign).astype(np.int64)
    keys <<= 1
    keys |= labels
    keys.sort()
    return keys & 1, (keys[1:] ^ keys[:-1]).view(np.uint64) > 1


def threshold_counts(scores, labels):
    """Sort once; count the trials below every distinct score (the ROC, in exact integer counts).

    Returns (tar, non, n_tar, n_non): float64 arrays of T+1 entries for T distinct scores, numpy on
    the CPU and tensors on a GPU. Entry k holds the target and non-target trials scoring below the
    k-th smallest distinct score (the threshold "accept if score >= it"); the last entry, every
    trial, is the threshold above all scores. Tied scores form a single threshold.
    """
    scores, labels = _metric_inputs(scores, labels)
    n = labels.shape[0]
    n_tar = int(labels.sum())
    if n_tar == 0 or n_tar == n:
        raise ValueError("metrics need at least one target and one non-target trial")
    if not bool(scores.isfinite().all() if isinstance(scores, torch.Tensor) else np.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf")
    if isinstance(scores, torch.Tensor):
        ordered, order = torch.sort(scores)
        sorted_labels, new = labels[order], ordered[1:] != ordered[:-1]
        below = torch.zeros(n + 1, dtype=torch.float64, device=scores.device)
        below[1:] = torch.cumsum(sorted_labels, 0, dtype=torch.float64)
        ends = torch.tensor([n], device=scores.device)
        starts = torch.cat([ends - n, torch.nonzero(new).squeeze(1) + 1, ends])
    else:
        if scores.dtype == np.float32:
            sorted_labels, new = _sorted_float32(scores, labels)
        else:
            order = np.argsort(scores)
            ordered, sorted_labels = scores[order], labels[order]
            new = ordered[1:] != ordered[:-1]
        below = np.zeros(n + 1)
        np.cumsum(sorted_labels, dtype=np.float64, out=below[1:])
        if new.all():  # no ties: every position is a threshold
            return below, np.arange(n + 1, dtype=np.float64) - below, n_tar, n - n_tar
        starts = np.concatenate([[0], np.flatnonzero(new) + 1, [n]])
    tar = below[starts]
    return tar, starts - tar, n_tar, n - n_tar


def _eer(tar, non, n_tar, n_non):
    """EER from threshold counts: bisect the increasing n_tar*n_non*(fnr - fpr) in exact integers.

    The two thresholds around the crossing are then compared with sklearn's float formulas
    (fnr = 1 - tp/n_tar, fpr = fp/n_non, the higher threshold first), so exact ties resolve as
    `roc_curve` followed by argmin |fnr - fpr| does.
    """

    def gap(k):
        return int(tar[k]) * n_non - (n_non - int(non[k])) * n_tar

    def rates(k):
        return 1.0 - (n_tar - float(tar[k])) / n_tar, (n_non - float(non[k])) / n_non

    lo, hi = 0, len(tar) - 1  # gap(lo) < 0 < gap(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if gap(mid) < 0:
            lo = mid
        else:
            hi = mid
    (fnr_lo, fpr_lo), (fnr_hi, fpr_hi) = rates(lo), rates(hi)
    if abs(fnr_lo - fpr_lo) < abs(fnr_hi - fpr_hi):
        return (fnr_lo + fpr_lo) / 2
    return (fnr_hi + fpr_hi) / 2


def _mindcf(tar, non, n_tar, n_non, p_target, c_miss, c_fa):
    """Normalised minimum of c_miss*p*fnr + c_fa*(1-p)*fpr over the thresholds (one pass)."""
    w_miss, w_fa = c_miss * p_target / n_tar, c_fa * (1.0 - p_target) / n_non
    best = float((tar * w_miss - non * w_fa).min()) + c_fa * (1.0 - p_target)
    return best / min(c_miss * p_target, c_fa * (1.0 - p_target))


def _auc(tar, non, n_tar, n_non):
    """Area under the ROC: P(target > non-target) + P(tie) / 2, from the counts of each tied run."""
    twice_u = (tar[1:] - tar[:-1]) @ (non[1:] + non[:-1])
    return float(twice_u) / (2.0 * n_tar * n_non)


def roc_points(scores, labels):
    """Miss and false-alarm rates at every distinct threshold, from one sort.

    Returns (fnr, fpr) as float64 tensors of length T+1 (T distinct scores), ordered from the
    threshold above every score (nothing accepted: fnr=1, fpr=0) down to the lowest score
    (everything accepted: fnr=0, fpr=1). Tied scores form a single point.
    """
    tar, non, n_tar, n_non = threshold_counts(scores, labels)
    fnr = torch.as_tensor(tar) / n_tar
    fpr = 1.0 - torch.as_tensor(non) / n_non
    return fnr.flip(0), fpr.flip(0)


def compute_eer(scores, labels):
    """Equal error rate in [0, 1]: the ROC point where miss and false-alarm rates are closest, averaged.

    `scores`: higher means more likely target; `labels`: 1 target, 0 non-target (arrays or tensors).
    """
    return _eer(*threshold_counts(scores, labels))


def compute_mindcf(scores, labels, p_target=0.01, c_miss=1, c_fa=1):
    """Normalised minimum detection cost (NIST/Kaldi definition) over all thresholds."""
    return _mindcf(*threshold_counts(scores, labels), p_target, c_miss, c_fa)


def compute_auc(scores, labels):
    """Area under the ROC curve, ties counted as half."""
    return _auc(*threshold_counts(scores, labels))


def compute_metrics(scores, labels, p_targets=(0.01, 0.05), c_miss=1, c_fa=1):
    """EER, minDCF at each p_target and AUC from one sort; scores on a GPU are sorted there."""
    counts = threshold_counts(scores, labels)
    out = {"eer": _eer(*counts)}
    for p in p_targets:
        out[f"mindcf_{p:g}"] = _mindcf(*counts, p, c_miss, c_fa)
    out["auc"] = _auc(*counts)
    return out


def format_metrics_table(results):
    """Render {scorer: metrics} as an aligned text table (one row per scorer)."""
    names = list(next(iter(results.values())).keys())
    header = f"{'scorer':<8}" + "".join(f"{n:>14}" for n in names)
    rows = [header]
    for scorer, metrics in results.items():
        rows.append(f"{scorer:<8}" + "".join(f"{metrics[n]:>14.4f}" for n in names))
    return "\n".join(rows)
