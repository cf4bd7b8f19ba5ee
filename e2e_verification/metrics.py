"""Verification metrics from one sort: EER, minDCF, AUC, ROC points and the printed table.

Scores may be numpy arrays or tensors; on a GPU they are sorted there.
"""

import numpy as np
import torch


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
    normalised = (best + c_fa * (1.0 - p_target)) / min(c_miss * p_target, c_fa * (1.0 - p_target))
    # By definition 0 <= minDCF <= 1 (accepting or rejecting everything costs at most the normaliser), but
    # `best + c_fa * (1 - p)` cancels in floating point: 0.01 - 0.99 + 0.99 gives 1.0000000000000009 / 0.01.
    return min(max(normalised, 0.0), 1.0)


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


def format_table(results, keys):
    """{scorer: metrics} -> an aligned text table of `keys`. The scorer column widens into the first number's
    padding, so names up to 7 characters print exactly as metrics.format_metrics_table."""
    width = max(8, max(len(name) for name in results) + 1)
    first = max(22 - width, len(keys[0]) + 2, 8)
    rows = ["scorer".ljust(width) + keys[0].rjust(first) + "".join(k.rjust(14) for k in keys[1:])]
    for name, values in results.items():
        rows.append(
            name.ljust(width) + f"{values[keys[0]]:>{first}.4f}" + "".join(f"{values[k]:>14.4f}" for k in keys[1:])
        )
    return "\n".join(rows)


def format_metrics_table(results):
    """Render {scorer: metrics} as an aligned text table (one row per scorer, the first scorer's keys)."""
    return format_table(results, list(next(iter(results.values())).keys()))


# ----------------------------------------------------------------------------- likelihood-ratio metrics
# These judge scores as log-likelihood ratios (natural log), not only their order: Cllr (the logarithmic
# cost of using them to make Bayes decisions at every prior), minCllr (the same after the best monotone
# recalibration, which only discrimination limits) and the actual DCF at the Bayes threshold.

LLR_CLIP = 50.0
"""Bound (nats) for the infinite LLRs of PAV blocks holding one class only. A finite PAV LLR is
log(tar/non) - log(n_tar/n_non), within +-2 log(n) < 50 for n < 7e10 trials, so clipping keeps the order;
each clipped trial then adds log2(1 + e^-50) ~ 3e-22 bits to the Cllr."""


def _llr_inputs(llr, labels):
    """Flat float64 numpy LLRs (or scores) and bool labels, with both classes; NaN raises, +-inf is allowed.

    Tensors on any device are copied to the CPU (these metrics need float64 and no sort on the GPU).
    """
    if isinstance(llr, torch.Tensor):
        llr = llr.detach().cpu()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu()
    llr, labels = _metric_inputs(llr, labels)
    llr = llr.astype(np.float64, copy=False)
    n_tar = int(labels.sum())
    if n_tar == 0 or n_tar == labels.shape[0]:
        raise ValueError("metrics need at least one target and one non-target trial")
    if np.isnan(llr).any():
        raise ValueError("scores contain NaN")
    return llr, labels


def _cllr_terms(llr_tar, llr_non):
    """Cllr in bits from the target and non-target LLRs: log(1 + e^x) as logaddexp(0, x), stable in float64."""
    c_tar = np.logaddexp(0.0, -llr_tar).mean()
    c_non = np.logaddexp(0.0, llr_non).mean()
    return float(0.5 * (c_tar + c_non) / np.log(2.0))


def cllr(llr, labels):
    """Log-likelihood-ratio cost in bits: 1/2 [mean_tar log2(1 + e^-llr) + mean_non log2(1 + e^llr)].

    `llr`: (n,) natural-log likelihood ratios; `labels`: (n,) 1 target, 0 non-target. 0 is perfect, 1 is
    what an uninformative llr = 0 costs; above 1 the LLRs do harm. A wrong-sided infinite LLR costs inf.
    """
    llr, labels = _llr_inputs(llr, labels)
    return _cllr_terms(llr[labels], llr[~labels])


def _pav_blocks(tar, count):
    """Pool adjacent violators over groups in score order: -> (block ends, targets per block, trials per block).

    `tar`, `count`: (g,) int targets and trials of each group of tied scores, ascending scores. The
    blocks' target rates tar/count are the non-decreasing least-squares fit of the labels (ties pooled);
    block k spans groups ends[k-1]..ends[k]-1. Rates are compared by exact integer cross-multiplication.
    """
    ends, t_blk, n_blk = [], [], []
    for i, (t, n) in enumerate(zip(tar.tolist(), count.tolist())):
        while t_blk and t_blk[-1] * n >= t * n_blk[-1]:  # previous rate >= this one: pool
            t += t_blk.pop()
            n += n_blk.pop()
            ends.pop()
        ends.append(i + 1)
        t_blk.append(t)
        n_blk.append(n)
    return np.asarray(ends), np.asarray(t_blk, dtype=np.float64), np.asarray(n_blk, dtype=np.float64)


def _pav_unclipped(scores, labels):
    """PAV LLRs of each trial, +-inf where a block holds one class only, from float64 scores and bool labels."""
    values, inverse = np.unique(scores, return_inverse=True)
    tar = np.bincount(inverse, weights=labels, minlength=len(values)).astype(np.int64)
    count = np.bincount(inverse, minlength=len(values))
    # Neighbouring groups with equal target rates (runs of one class) end in one PAV block: pool them first.
    new_rate = np.concatenate([[True], tar[1:] * count[:-1] != tar[:-1] * count[1:]])
    starts = np.flatnonzero(new_rate)
    ends, t_blk, n_blk = _pav_blocks(np.add.reduceat(tar, starts), np.add.reduceat(count, starts))
    with np.errstate(divide="ignore"):
        block_llr = np.log(t_blk) - np.log(n_blk - t_blk)  # logit of the block's target rate
    n_tar = int(labels.sum())
    block_llr -= np.log(n_tar) - np.log(labels.shape[0] - n_tar)  # minus the log prior odds of the data
    run_llr = np.repeat(block_llr, np.diff(ends, prepend=0))
    return run_llr[np.cumsum(new_rate) - 1][inverse]


def pav_llr(scores, labels):
    """The optimal monotone calibration of `scores` on these labels, as LLRs: (n,) float64.

    Pool-adjacent-violators gives the non-decreasing posterior P(target | score) (tied scores share
    one value); its log odds minus the data's log prior odds log(n_tar/n_non) is the LLR. Blocks that
    hold only targets (only non-targets) have posterior 1 (0), an infinite LLR, clipped to +-LLR_CLIP.
    """
    scores, labels = _llr_inputs(scores, labels)
    return np.clip(_pav_unclipped(scores, labels), -LLR_CLIP, LLR_CLIP)


def min_cllr(scores, labels):
    """Cllr (bits) after the optimal monotone calibration (PAV): what the scores' discrimination alone costs.

    The PAV LLRs are the optimal calibration on the ROC convex hull; cllr(llr) - min_cllr(llr) is the
    calibration loss. The unclipped PAV LLRs are used, so perfectly separated scores give exactly 0.
    """
    scores, labels = _llr_inputs(scores, labels)
    llr = _pav_unclipped(scores, labels)
    return _cllr_terms(llr[labels], llr[~labels])


def _act_dcf(llr, labels, p_target, c_miss, c_fa):
    """act_dcf on checked float64 LLRs and bool labels."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must lie in (0, 1), got {p_target}")
    threshold = np.log(c_fa * (1.0 - p_target)) - np.log(c_miss * p_target)
    accept = llr >= threshold
    p_miss = float((~accept[labels]).mean())
    p_fa = float(accept[~labels].mean())
    cost = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return cost / min(c_miss * p_target, c_fa * (1.0 - p_target))


def act_dcf(llr, labels, p_target, c_miss=1, c_fa=1):
    """Normalised actual detection cost of decisions made from the LLRs at the Bayes threshold.

    A trial is accepted when llr >= log(c_fa (1 - p) / (c_miss p)) (log((1-p)/p) for unit costs; a tie
    is accepted). The cost c_miss p P_miss + c_fa (1-p) P_fa is divided by min(c_miss p, c_fa (1-p)), as
    for compute_mindcf, so act_dcf >= minDCF, with equality for perfectly calibrated LLRs.
    """
    llr, labels = _llr_inputs(llr, labels)
    return _act_dcf(llr, labels, p_target, c_miss, c_fa)


def llr_metrics(llr, labels, p_targets=(0.01, 0.05)):
    """{"cllr", "min_cllr", "act_dcf_<p>" for each p in p_targets} of LLRs (unit costs)."""
    llr, labels = _llr_inputs(llr, labels)
    out = {"cllr": _cllr_terms(llr[labels], llr[~labels])}
    pav = _pav_unclipped(llr, labels)
    out["min_cllr"] = _cllr_terms(pav[labels], pav[~labels])
    for p in p_targets:
        out[f"act_dcf_{p:g}"] = _act_dcf(llr, labels, p, 1, 1)
    return out
