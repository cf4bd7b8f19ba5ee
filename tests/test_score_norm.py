"""S-norm / AS-norm against a direct per-trial loop (NumPy, float64), for cosine and a nonlinear scorer."""

import importlib
import os
import re

import numpy as np
import pytest
import torch

from e2e_verification.score_norm import cohort_stats, cosine_block, snorm, snorm_trials
from utils import UserError

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


class RandomPairScorer:
    """A small nonlinear, asymmetric scorer: s(a, b) = v . tanh(a Wa + b Wb + c) + 0.1 a.b, in two independent forms."""

    def __init__(self, dim, hidden=7, seed=0):
        rng = np.random.default_rng(seed)
        self.wa, self.wb = rng.normal(size=(dim, hidden)), rng.normal(size=(dim, hidden))
        self.c, self.v = rng.normal(size=hidden), rng.normal(size=hidden)

    def block(self, a, b):
        """Torch block form: a (n, d), b (m, d) -> (n, m)."""
        wa, wb, c, v = (torch.as_tensor(p, dtype=a.dtype, device=a.device) for p in (self.wa, self.wb, self.c, self.v))
        hidden = torch.tanh((a @ wa)[:, None, :] + (b @ wb)[None, :, :] + c)
        return hidden @ v + 0.1 * a @ b.T

    def one_against(self, item, cohort):
        """NumPy form: one item (d,) against cohort (c, d) -> (c,), a loop over the cohort."""
        return np.array(
            [self.v @ np.tanh(item @ self.wa + other @ self.wb + self.c) + 0.1 * item @ other for other in cohort]
        )


def cosine_one_against(item, cohort):
    return np.array([item @ other / np.sqrt((item @ item) * (other @ other)) for other in cohort])


def direct_snorm(raw, enroll, test, enroll_idx, test_idx, cohort, one_against, top_n):
    """Per trial: both items' scores against the cohort recomputed, the top-N kept (sorted), the formula applied."""
    out = []
    for k, s in enumerate(raw):
        parts = []
        for item in (enroll[enroll_idx[k]], test[test_idx[k]]):
            scores = np.sort(one_against(item, cohort))[::-1][: top_n or len(cohort)]
            parts.append((s - scores.mean()) / scores.std())
        out.append(0.5 * sum(parts))
    return np.array(out)


@pytest.mark.parametrize("scorer", ["cosine", "nonlinear"])
@pytest.mark.parametrize("top_n", [None, 7])
def test_matches_direct_per_trial_loop(device, scorer, top_n):
    rng = np.random.default_rng(1)
    dim = 6
    enroll, test, cohort = rng.normal(size=(9, dim)), rng.normal(size=(11, dim)), rng.normal(size=(25, dim))
    enroll_idx, test_idx = rng.integers(0, 9, 60), rng.integers(0, 11, 60)
    if scorer == "cosine":
        block, one_against = cosine_block, cosine_one_against
    else:
        pair = RandomPairScorer(dim)
        block, one_against = pair.block, pair.one_against
    raw = rng.normal(size=60)
    expected = direct_snorm(raw, enroll, test, enroll_idx, test_idx, cohort, one_against, top_n)
    tensors = [torch.as_tensor(a, device=device) for a in (enroll, test, cohort)]
    got = snorm_trials(
        torch.as_tensor(raw), tensors[0], tensors[1], enroll_idx, test_idx, tensors[2], block, top_n, chunk=4
    )
    assert got.dtype == torch.float64 and got.shape == (60,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # the pieces by hand: stats per item, then the formula
    stats_e = cohort_stats(tensors[0], tensors[2], block, top_n, chunk=3)
    stats_t = cohort_stats(tensors[1], tensors[2], block, top_n)
    np.testing.assert_allclose(
        snorm(raw, enroll_idx, test_idx, stats_e, stats_t).numpy(), expected, rtol=1e-5, atol=1e-5
    )


def test_shared_embedding_matrix_scores_each_item_once():
    """Speech trials index one matrix of utterances: each used row is scored against the cohort once."""
    rng = np.random.default_rng(2)
    emb, cohort = torch.as_tensor(rng.normal(size=(10, 5))), torch.as_tensor(rng.normal(size=(30, 5)))
    idx_a, idx_b = np.array([0, 0, 1, 2, 2, 2]), np.array([1, 3, 3, 0, 1, 3])  # rows 4..9 unused
    seen = []

    def counting_block(a, b):
        seen.append(len(a))
        return cosine_block(a, b)

    raw = torch.as_tensor(rng.normal(size=6))
    got = snorm_trials(raw, emb, emb, idx_a, idx_b, cohort, counting_block, top_n=10)
    assert sum(seen) == 4  # rows 0, 1, 2, 3
    expected = direct_snorm(raw.numpy(), emb.numpy(), emb.numpy(), idx_a, idx_b, cohort.numpy(), cosine_one_against, 10)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_float32_cosine_close_to_float64():
    rng = np.random.default_rng(3)
    emb, cohort = rng.normal(size=(20, 64)), rng.normal(size=(200, 64))
    mean64, std64 = cohort_stats(torch.as_tensor(emb), torch.as_tensor(cohort), cosine_block, 50)
    mean32, std32 = cohort_stats(torch.as_tensor(emb).float(), torch.as_tensor(cohort).float(), cosine_block, 50)
    np.testing.assert_allclose(mean32.numpy(), mean64.numpy(), atol=1e-6)
    np.testing.assert_allclose(std32.numpy(), std64.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "top_n, size, message", [(1, 10, "between 2 and"), (11, 10, "between 2 and"), (None, 1, "at least 2")]
)
def test_bad_cohort_settings(top_n, size, message):
    with pytest.raises(UserError, match=message):
        cohort_stats(torch.zeros(3, 4), torch.ones(size, 4), cosine_block, top_n)


def test_bench_tiny_run_agrees_with_direct(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(BENCH)
    bench = importlib.import_module("score_norm_speed")
    argv = ["--device", "cpu", "--trials", "300", "--enroll", "20", "--test", "30", "--cohort", "50"]
    argv += ["--out", str(tmp_path / "performance.md")]  # never the committed page
    assert bench.main(argv + ["--emb-size", "16", "--top-n", "10", "--direct-trials", "100", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|vectorised - direct\| (\S+)", out).group(1)) < 1e-4
    assert "scaled to 300" in out and re.search(r"vectorised: .* -> [\d.]+x", out)
