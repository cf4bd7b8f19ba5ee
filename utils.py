"""Shared helpers: user errors, atomic outputs, devices, seeding, checkpoints and verification metrics."""

import argparse
import contextlib
import json
import os
import pickle
import random
import re
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so `cli` prints one line (no usage block) and exits 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


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


def choose_device(name=None):
    """Pick the torch device: `name` if given, else cuda when present."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"bad --device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine")
    return device


def add_device_flags(parser):
    """The device flags every script shares: --device, the seed's --no-cuda and --cuda True/False, --amp."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    parser.add_argument("--no-cuda", action="store_true", help="seed spelling of --device cpu")
    parser.add_argument("--cuda", type=str2bool, default=None, help="seed spelling: True/False")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")


def device_from_args(args):
    """The device that add_device_flags' flags ask for (--no-cuda / --cuda False mean the CPU)."""
    if args.no_cuda or args.cuda is False:
        args.device = args.device or "cpu"
    return choose_device(args.device)


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms():
    """Make training repeatable: the same seed and flags give the same weights, also with several threads.

    Without this, some CPU kernels (index accumulation in the pair loss's backward) sum in a thread-
    dependent order, and two runs drift apart. On CUDA it selects deterministic kernels (cuBLAS needs
    the workspace setting below, which must be in place before its first use); operations that have no
    deterministic version only warn.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


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
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (global|operand)[^.]*?([\w.]+) was not", str(err))
        what = f" ({found.group(2)})" if found else ""
        raise UserError(
            f"refusing to load {path}: it holds Python objects{what} besides tensors, and checkpoints are "
            "loaded weights only so that no code in them can run"
        ) from None
    except Exception:  # torch raises RuntimeError, EOFError, KeyError, ... on damaged files
        raise UserError(f"cannot read checkpoint {path}: truncated, damaged or not a PyTorch file") from None
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

    Returns (tar, non, n_tar, n_non): int64 arrays of T+1 entries for T distinct scores, numpy on
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
    tar, non = (_torch_counts if isinstance(scores, torch.Tensor) else _numpy_counts)(scores, labels)
    return tar, non, n_tar, n - n_tar


def _torch_counts(scores, labels):
    """threshold_counts' (tar, non) with torch ops, for scores on a GPU (they run on any device)."""
    n = labels.shape[0]
    ordered, order = torch.sort(scores)
    below = torch.zeros(n + 1, dtype=torch.int64, device=scores.device)
    below[1:] = torch.cumsum(labels[order], 0)
    ends = torch.tensor([n], device=scores.device)
    starts = torch.cat([ends - n, torch.nonzero(ordered[1:] != ordered[:-1]).squeeze(1) + 1, ends])
    tar = below[starts]
    return tar, starts - tar


def _numpy_counts(scores, labels):
    """threshold_counts' (tar, non) with numpy: one int64 value sort for float32 scores, else an argsort."""
    n = labels.shape[0]
    if scores.dtype == np.float32:
        sorted_labels, new = _sorted_float32(scores, labels)
    else:
        order = np.argsort(scores)
        ordered, sorted_labels = scores[order], labels[order]
        new = ordered[1:] != ordered[:-1]
    below = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sorted_labels, out=below[1:])
    if new.all():  # no ties: every position is a threshold
        return below, np.arange(n + 1) - below
    starts = np.concatenate([[0], np.flatnonzero(new) + 1, [n]])
    tar = below[starts]
    return tar, starts - tar


def _target_runs(tar, non):
    """The thresholds just below a run of scores holding targets: float64 (tar, non, next non, targets in run).

    Between them only non-targets pass, which lowers every detection cost, so the minimum cost lies
    at one of them (or above all scores), and only they add area under the ROC. The counts stay
    exact integers in float64.
    """
    grows = tar[1:] != tar[:-1]
    if isinstance(grows, torch.Tensor):
        k = torch.nonzero(grows).squeeze(1)
        runs = (tar[k], non[k], non[k + 1], tar[k + 1] - tar[k])
        return tuple(x.double() for x in runs)
    k = np.flatnonzero(grows)
    return tuple(x.astype(np.float64) for x in (tar[k], non[k], non[k + 1], tar[k + 1] - tar[k]))


def _eer(tar, non, n_tar, n_non):
    """EER from threshold counts: bisect the increasing n_tar*n_non*(fnr - fpr) in exact integers.

    The two thresholds around the crossing are then compared with sklearn's float formulas
    (fnr = 1 - tp/n_tar, fpr = fp/n_non, the higher threshold first), so exact ties resolve as
    `roc_curve` followed by argmin |fnr - fpr| does.
    """

    if isinstance(tar, torch.Tensor):  # on a GPU: one search there, not one transfer per bisection step
        gap = tar * n_non - (n_non - non) * n_tar
        hi = int(torch.searchsorted(gap, gap.new_zeros(1)))
    else:
        lo, hi = 0, len(tar) - 1  # gap < 0 at lo, >= 0 at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(tar[mid]) * n_non - (n_non - int(non[mid])) * n_tar < 0:
                lo = mid
            else:
                hi = mid
    rates = [
        (1.0 - (n_tar - t) / n_tar, (n_non - f) / n_non)
        for t, f in zip(tar[hi - 1 : hi + 1].tolist(), non[hi - 1 : hi + 1].tolist())
    ]
    (fnr_lo, fpr_lo), (fnr_hi, fpr_hi) = rates
    if abs(fnr_lo - fpr_lo) < abs(fnr_hi - fpr_hi):
        return (fnr_lo + fpr_lo) / 2
    return (fnr_hi + fpr_hi) / 2


def _mindcf(runs, n_tar, n_non, p_target, c_miss, c_fa):
    """Normalised minimum of c_miss*p*fnr + c_fa*(1-p)*fpr over the thresholds; `runs` from _target_runs."""
    tar, non = runs[0], runs[1]
    w_miss, w_fa = c_miss * p_target / n_tar, c_fa * (1.0 - p_target) / n_non
    best = min(float((tar * w_miss - non * w_fa).min()), c_miss * p_target - c_fa * (1.0 - p_target))
    return (best + c_fa * (1.0 - p_target)) / min(c_miss * p_target, c_fa * (1.0 - p_target))


def _auc(runs, n_tar, n_non):
    """Area under the ROC, P(target > non-target) + P(tie) / 2: each target outranks the non-targets
    below its run and half of those tied with it."""
    _, non, non_next, targets = runs
    return float((targets * (non + non_next)).sum()) / (2.0 * n_tar * n_non)


def roc_points(scores, labels):
    """Miss and false-alarm rates at every distinct threshold, from one sort.

    Returns (fnr, fpr) as float64 tensors of length T+1 (T distinct scores), ordered from the
    threshold above every score (nothing accepted: fnr=1, fpr=0) down to the lowest score
    (everything accepted: fnr=0, fpr=1). Tied scores form a single point.
    """
    tar, non, n_tar, n_non = threshold_counts(scores, labels)
    fnr = torch.as_tensor(tar).double() / n_tar
    fpr = 1.0 - torch.as_tensor(non).double() / n_non
    return fnr.flip(0), fpr.flip(0)


def compute_eer(scores, labels):
    """Equal error rate in [0, 1]: the ROC point where miss and false-alarm rates are closest, averaged.

    `scores`: higher means more likely target; `labels`: 1 target, 0 non-target (arrays or tensors).
    """
    return _eer(*threshold_counts(scores, labels))


def compute_mindcf(scores, labels, p_target=0.01, c_miss=1, c_fa=1):
    """Normalised minimum detection cost (NIST/Kaldi definition) over all thresholds."""
    tar, non, n_tar, n_non = threshold_counts(scores, labels)
    return _mindcf(_target_runs(tar, non), n_tar, n_non, p_target, c_miss, c_fa)


def compute_auc(scores, labels):
    """Area under the ROC curve, ties counted as half."""
    tar, non, n_tar, n_non = threshold_counts(scores, labels)
    return _auc(_target_runs(tar, non), n_tar, n_non)


def compute_metrics(scores, labels, p_targets=(0.01, 0.05), c_miss=1, c_fa=1):
    """EER, minDCF at each p_target and AUC from one sort; scores on a GPU are sorted there."""
    tar, non, n_tar, n_non = threshold_counts(scores, labels)
    runs = _target_runs(tar, non)
    out = {"eer": _eer(tar, non, n_tar, n_non)}
    for p in p_targets:
        out[f"mindcf_{p:g}"] = _mindcf(runs, n_tar, n_non, p, c_miss, c_fa)
    out["auc"] = _auc(runs, n_tar, n_non)
    return out


def format_metrics_table(results):
    """Render {scorer: metrics} as an aligned text table (one row per scorer)."""
    names = list(next(iter(results.values())).keys())
    header = f"{'scorer':<8}" + "".join(f"{n:>14}" for n in names)
    rows = [header]
    for scorer, metrics in results.items():
        rows.append(f"{scorer:<8}" + "".join(f"{metrics[n]:>14.4f}" for n in names))
    return "\n".join(rows)
