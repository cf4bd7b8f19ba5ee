"""Score normalisation against a cohort: S-norm and adaptive S-norm (AS-norm), for any block scorer.

A scorer is given as a block function `score_block(A (n, d), B (m, d)) -> (n, m)` tensor (cosine_block
below; a learned distance's block scorer fits the same slot). For every item on each side of the trials,
its scores against the cohort give a mean and a standard deviation, over all cohort items (S-norm) or
over its top_n highest scores only (AS-norm, Cumani et al. / Matejka et al. 2017). A trial's raw score s
between enroll item e and test item t becomes
    0.5 * ((s - mean_e) / std_e + (s - mean_t) / std_t).
Each item is scored against the cohort once, however many trials it appears in, and always as the
first argument of score_block (pass `lambda a, b: block(b, a).T` to put it second). Standard
deviations are population ones (divide by the count). Memory is bounded: `chunk` items at a time.
"""

import torch
import torch.nn.functional as F

from utils import UserError

CHUNK_ELEMENTS = 1 << 22  # cohort scores held at once, when no chunk size is given


def cosine_block(a, b):
    """Cosine similarity of every row of a (n, d) with every row of b (m, d) -> (n, m)."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


@torch.no_grad()
def cohort_stats(emb, cohort, score_block, top_n=None, chunk=None):
    """Mean and std (n,) float64 of each item's scores against the cohort: all c of them, or the top_n highest.

    emb: (n, d) items, cohort: (c, d), both on the device score_block runs on; chunk: items scored per
    block (default about CHUNK_ELEMENTS / c), so at most chunk x c scores exist at a time.
    """
    n, size = len(emb), len(cohort)
    if size < 2:
        raise UserError(f"score normalisation needs a cohort of at least 2 items, got {size}")
    if top_n is not None and not 2 <= top_n <= size:
        raise UserError(f"the AS-norm top-N must be between 2 and the cohort size {size}, got {top_n}")
    if chunk is not None and chunk < 1:
        raise UserError(f"chunk must be >= 1, got {chunk}")
    step = chunk or max(1, CHUNK_ELEMENTS // size)
    mean = torch.empty(n, dtype=torch.float64, device=emb.device)
    std = torch.empty(n, dtype=torch.float64, device=emb.device)
    for start in range(0, n, step):
        scores = score_block(emb[start : start + step], cohort)
        if top_n is not None and top_n < size:
            scores = torch.topk(scores, top_n, dim=1, sorted=False).values
        scores = scores.double()
        mean[start : start + step] = scores.mean(1)
        std[start : start + step] = scores.std(1, correction=0)
    check_stats(mean, std)
    return mean, std


def check_stats(mean, std, tiny=1e-12):
    """UserError when an item's cohort scores are not finite or have no spread (std <= tiny): normalising by
    them would give NaN or Inf scores (a cohort of identical or zero vectors, or NaN embeddings)."""
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise UserError(
            "the scores against the cohort hold NaN or Inf: the cohort or the evaluated embeddings are not finite"
        )
    flat = int((std <= tiny).sum())
    if flat:
        raise UserError(
            f"{flat} of {len(std)} items score the same against every cohort member (no spread to normalise by): "
            "the cohort's embeddings are identical or zero"
        )


def snorm(raw, enroll_idx, test_idx, stats_e, stats_t):
    """Normalised scores (T,) float64 of raw trial scores (T,): enroll_idx / test_idx (T,) index the rows of
    stats_e = (mean, std) and stats_t = (mean, std) from cohort_stats. Output on raw's device."""
    raw = torch.as_tensor(raw)
    device = raw.device
    raw = raw.to(torch.float64)
    enroll_idx = torch.as_tensor(enroll_idx, dtype=torch.long, device=device)
    test_idx = torch.as_tensor(test_idx, dtype=torch.long, device=device)
    mean_e, std_e = (torch.as_tensor(s, device=device, dtype=torch.float64)[enroll_idx] for s in stats_e)
    mean_t, std_t = (torch.as_tensor(s, device=device, dtype=torch.float64)[test_idx] for s in stats_t)
    return 0.5 * ((raw - mean_e) / std_e + (raw - mean_t) / std_t)


def snorm_trials(raw, enroll_emb, test_emb, enroll_idx, test_idx, cohort, score_block, top_n=None, chunk=None):
    """S-norm (top_n None) or AS-norm of trial scores raw (T,): trial k pairs enroll_emb[enroll_idx[k]] with
    test_emb[test_idx[k]]. Only the items that some trial uses are scored against the cohort, each once;
    pass the same tensor as enroll_emb and test_emb (speech: one matrix of utterances) to share them.
    -> (T,) float64 on raw's device."""
    device = enroll_emb.device
    enroll_idx = torch.as_tensor(enroll_idx, dtype=torch.long, device=device)
    test_idx = torch.as_tensor(test_idx, dtype=torch.long, device=device)
    if test_emb is enroll_emb:
        used, inverse = torch.unique(torch.cat([enroll_idx, test_idx]), return_inverse=True)
        stats = cohort_stats(enroll_emb[used], cohort, score_block, top_n, chunk)
        return snorm(raw, inverse[: len(enroll_idx)], inverse[len(enroll_idx) :], stats, stats)
    used_e, inverse_e = torch.unique(enroll_idx, return_inverse=True)
    used_t, inverse_t = torch.unique(test_idx, return_inverse=True)
    stats_e = cohort_stats(enroll_emb[used_e], cohort, score_block, top_n, chunk)
    stats_t = cohort_stats(test_emb[used_t], cohort, score_block, top_n, chunk)
    return snorm(raw, inverse_e, inverse_t, stats_e, stats_t)
