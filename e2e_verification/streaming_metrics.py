"""Metrics of scored pairs in bounded memory: EER, minDCF and AUC identical to metrics.compute_metrics, and
Cllr, minCllr and actDCF as metrics.llr_metrics, for tens of millions of pairs.

One scorer at a time: its target and non-target scores are copied out (4 bytes a pair, float32) and sorted;
a walk over their distinct values in ascending order then gives the ROC's threshold counts a chunk at a
time, reduced on the fly with metrics.py's own formulas (so the results are identical) and, for LLR
scorers, to Cllr, minCllr (pool-adjacent-violators over the same walk) and actDCF. The pairs come from a
scoring.PairTable (anything with `n_targets`, `labels(start, stop)`, `chunks(chunk)` and
`block(scorers, start, stop)[name]`).
"""

import math

import numpy as np
import torch

from e2e_verification.metrics import _eer, _mindcf, _target_runs

CHUNK = 1 << 20  # pairs per step
WALK_CHUNK = 1 << 18  # distinct values per step of the walk: its temporaries take ~80 bytes each


class NonFiniteScores(ValueError):
    """A score column holds NaN or Inf (metrics cannot rank it)."""


def as_float32(values):
    """A tensor (any device) or array -> float32 numpy on the CPU."""
    return values.detach().to("cpu", torch.float32).numpy() if torch.is_tensor(values) else np.float32(values)


def _split_sorted(table, scorers, name, chunk, consume=None):
    """Scorer `name`'s scores of the target and of the non-target pairs, each sorted: float32 numpy arrays.

    `consume`: a base result of the table that only this scorer still needs; its pieces (table.piece pairs,
    a multiple of CHUNK) are freed as they are read, so the sorted copies take the memory it held."""
    if consume is not None:
        chunk = math.gcd(CHUNK, table.piece)  # chunks never straddle a piece
    n_tar = table.n_targets
    if n_tar == 0 or n_tar == len(table):
        raise ValueError("metrics need at least one target and one non-target trial")
    tar = np.empty(n_tar, dtype=np.float32)
    non = np.empty(len(table) - n_tar, dtype=np.float32)
    t = u = 0
    for start, stop in table.chunks(chunk):
        values, labels = as_float32(table.block(scorers, start, stop)[name]), table.labels(start, stop)
        if not np.isfinite(values).all():
            raise NonFiniteScores(f"scores of {name} contain NaN or Inf")
        chosen = values[labels]
        tar[t : t + len(chosen)] = chosen
        t += len(chosen)
        chosen = values[~labels]
        non[u : u + len(chosen)] = chosen
        u += len(chosen)
        if consume is not None and (stop % table.piece == 0 or stop == len(table)):
            table.release(consume, (stop - 1) // table.piece)
    tar.sort()
    non.sort()
    return tar, non


def distinct_counts(tar, non, chunk=CHUNK):
    """Walk the distinct values of two sorted arrays upwards: yield (targets, non-targets) int64 arrays, how
    many of each hold each distinct value (tied values, -0.0 and 0.0 included, are one), about 2*chunk at
    a time: values below a pivot (at most `chunk` from each side) plus the pivot's ties, counted by search."""
    i = j = 0
    while i < len(tar) or j < len(non):
        ends = [x[min(k + chunk, len(x)) - 1] for x, k in ((tar, i), (non, j)) if k < len(x)]
        pivot = min(ends)
        i_lo, i_hi = np.searchsorted(tar, pivot, "left"), np.searchsorted(tar, pivot, "right")
        j_lo, j_hi = np.searchsorted(non, pivot, "left"), np.searchsorted(non, pivot, "right")
        below_t, below_n = tar[i:i_lo], non[j:j_lo]
        values = np.union1d(below_t, below_n)
        t_eq = np.searchsorted(below_t, values, "right") - np.searchsorted(below_t, values, "left")
        n_eq = np.searchsorted(below_n, values, "right") - np.searchsorted(below_n, values, "left")
        yield np.append(t_eq, i_hi - i_lo).astype(np.int64), np.append(n_eq, j_hi - j_lo).astype(np.int64)
        i, j = i_hi, j_hi


class _RocReducer:
    """EER, minDCF and AUC from threshold counts fed in ascending order (metrics.threshold_counts' entries)."""

    def __init__(self, n_tar, n_non, p_targets):
        self.n_tar, self.n_non, self.p_targets = n_tar, n_non, p_targets
        self.last = None
        self.eer_pair = None
        self.mindcf = dict.fromkeys(p_targets, math.inf)
        self.auc_sum = 0.0  # a sum of integers below 2^53, so exact in any order

    def feed(self, tar, non):
        if self.last is not None:  # one entry of overlap: runs and the EER crossing may span chunks
            tar, non = np.concatenate([self.last[0], tar]), np.concatenate([self.last[1], non])
        self.last = (tar[-1:], non[-1:])
        if self.eer_pair is None:
            crossed = np.flatnonzero(tar * self.n_non - (self.n_non - non) * self.n_tar >= 0)
            if len(crossed):  # entry 0 (nothing below) is always < 0, so crossed[0] >= 1
                k = int(crossed[0])
                self.eer_pair = (tar[k - 1 : k + 1], non[k - 1 : k + 1])
        if len(tar) < 2:
            return
        runs = _target_runs(tar, non)
        if len(runs[0]):
            for p in self.p_targets:
                self.mindcf[p] = min(self.mindcf[p], _mindcf(runs, self.n_tar, self.n_non, p, 1, 1))
            _, below, below_next, targets = runs
            self.auc_sum += float((targets * (below + below_next)).sum())

    def result(self):
        out = {"eer": _eer(*self.eer_pair, self.n_tar, self.n_non)}
        for p in self.p_targets:
            out[f"mindcf_{p:g}"] = self.mindcf[p]
        out["auc"] = self.auc_sum / (2.0 * self.n_tar * self.n_non)
        return out


class _PavReducer:
    """minCllr from per-distinct-score (targets, non-targets) counts fed in ascending score order: the
    pool-adjacent-violators blocks (metrics.pav_llr's), kept as a stack of (targets, trials) per block."""

    def __init__(self):
        self.tar, self.count = [], []

    def feed(self, t_eq, n_eq):
        count = t_eq + n_eq
        # neighbours of equal target rate (runs of one class) end in one block: pool them first (fast path)
        new = np.ones(len(count), dtype=bool)
        new[1:] = t_eq[1:] * count[:-1] != t_eq[:-1] * count[1:]
        starts = np.flatnonzero(new)
        for t, n in zip(np.add.reduceat(t_eq, starts).tolist(), np.add.reduceat(count, starts).tolist()):
            while self.tar and self.tar[-1] * n >= t * self.count[-1]:  # previous rate >= this one: pool
                t += self.tar.pop()
                n += self.count.pop()
            self.tar.append(t)
            self.count.append(n)

    def min_cllr(self, n_tar, n_non):
        t = np.asarray(self.tar, dtype=np.float64)
        f = np.asarray(self.count, dtype=np.float64) - t
        with np.errstate(divide="ignore"):
            llr = np.log(t) - np.log(f) - (np.log(n_tar) - np.log(n_non))
        has_t, has_f = t > 0, f > 0  # a one-class block costs exactly 0 on its own side
        c_tar = float((t[has_t] * np.logaddexp(0.0, -llr[has_t])).sum()) / n_tar
        c_non = float((f[has_f] * np.logaddexp(0.0, llr[has_f])).sum()) / n_non
        return 0.5 * (c_tar + c_non) / math.log(2.0)


def _llr_costs(tar, non, p_targets, chunk):
    """Cllr (bits) and actDCF at each prior (unit costs, accept llr >= log((1-p)/p)) of sorted LLR arrays."""
    thresholds = {p: math.log(1.0 - p) - math.log(p) for p in p_targets}
    sums, below = [0.0, 0.0], {p: [0, 0] for p in p_targets}
    for side, (values, sign) in enumerate(((tar, -1.0), (non, 1.0))):
        for start in range(0, len(values), chunk):
            part = values[start : start + chunk].astype(np.float64)
            sums[side] += float(np.logaddexp(0.0, sign * part).sum())
            for p, threshold in thresholds.items():
                below[p][side] += int(np.count_nonzero(part < threshold))
    n_tar, n_non = len(tar), len(non)
    out = {"cllr": 0.5 * (sums[0] / n_tar + sums[1] / n_non) / math.log(2.0)}
    for p in p_targets:
        miss, false_alarm = below[p][0] / n_tar, (n_non - below[p][1]) / n_non
        out[f"act_dcf_{p:g}"] = (p * miss + (1.0 - p) * false_alarm) / min(p, 1.0 - p)
    return out


def table_metrics(table, scorers, name, p_targets=(0.01, 0.05), llr=False, chunk=CHUNK, consume=None):
    """Metrics of scorer `name` over a PairTable with about 4 bytes a pair of working memory (none with
    `consume`, see _split_sorted): {eer, mindcf_<p>, auc} equal to metrics.compute_metrics, plus with `llr`
    {cllr, min_cllr, act_dcf_<p>} (as metrics.llr_metrics, up to float summation order)."""
    tar, non = _split_sorted(table, scorers, name, chunk, consume)
    chunk = min(chunk, WALK_CHUNK)
    n_tar, n_non = len(tar), len(non)
    roc, pav = _RocReducer(n_tar, n_non, p_targets), _PavReducer() if llr else None
    below_t = below_n = 0
    for t_eq, n_eq in distinct_counts(tar, non, chunk):
        # threshold k: the trials below the k-th distinct score
        roc.feed(below_t + np.cumsum(t_eq) - t_eq, below_n + np.cumsum(n_eq) - n_eq)
        below_t, below_n = below_t + int(t_eq.sum()), below_n + int(n_eq.sum())
        if pav is not None:
            pav.feed(t_eq, n_eq)
    roc.feed(np.array([n_tar]), np.array([n_non]))  # the threshold above every score
    out = roc.result()
    if llr:
        costs = _llr_costs(tar, non, p_targets, chunk)
        out.update(cllr=costs.pop("cllr"), min_cllr=pav.min_cllr(n_tar, n_non), **costs)
    return out
