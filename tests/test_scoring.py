"""Scoring: the split first layer equals the concatenated discriminator, all-pairs order, score files."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2e_verification.scoring import fuse, pair_chunk, score_all_pairs, score_trials, write_score_file
from models.verifier import LearnedDistance

EMB, HIDDEN = 16, 8


def make_distance(device, rproj_size=12, ndiscriminators=2, n_hidden=2):
    torch.manual_seed(0)
    distance = LearnedDistance(EMB, HIDDEN, n_hidden, 0.25, ndiscriminators, rproj_size)
    return distance.to(device).eval()


def concatenated(distance, emb, idx_a, idx_b):
    """Reference e2e scores: LearnedDistance.forward on each pair's concatenated embeddings."""
    with torch.no_grad():
        return torch.sigmoid(distance(emb[idx_a], emb[idx_b])).mean(0)


# Chunk sizes in hidden activations: one pair per block, blocks of several rows (with triangle
# masks near the end of the matrix), and the default (the whole matrix in one block).
CHUNKS = (1, 7 * HIDDEN * 2, None)


@pytest.mark.parametrize("chunk_elements", CHUNKS)
@pytest.mark.parametrize("rproj_size", [12, 0])
def test_all_pairs_equal_concatenated_form_in_combinations_order(device, chunk_elements, rproj_size):
    distance = make_distance(device, rproj_size)
    n = 23
    emb = torch.randn(n, EMB, device=device)
    labels = torch.randint(0, 4, (n,), device=device)
    scores, target = score_all_pairs(distance, emb, labels, chunk_elements=chunk_elements)
    pairs = torch.tensor(list(itertools.combinations(range(n), 2)), device=device)
    idx_a, idx_b = pairs[:, 0], pairs[:, 1]
    assert scores["e2e"].shape == (n * (n - 1) // 2,)
    torch.testing.assert_close(scores["e2e"], concatenated(distance, emb, idx_a, idx_b), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["cos"], F.cosine_similarity(emb[idx_a], emb[idx_b]), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["fus"], fuse(scores["e2e"], scores["cos"]))
    assert torch.equal(target, labels[idx_a] == labels[idx_b])


@pytest.mark.parametrize("chunk_elements", CHUNKS)
def test_trial_lists_equal_concatenated_form(device, chunk_elements):
    distance = make_distance(device)
    emb = torch.randn(11, EMB, device=device)
    gen = torch.Generator().manual_seed(1)
    idx_a = torch.randint(0, 11, (40,), generator=gen)  # repeats, both orders and i == j included
    idx_b = torch.randint(0, 11, (40,), generator=gen)
    idx_b[:3] = idx_a[:3]
    scores = score_trials(distance, emb, idx_a.numpy(), idx_b.tolist(), chunk_elements=chunk_elements)
    idx_a, idx_b = idx_a.to(device), idx_b.to(device)
    torch.testing.assert_close(scores["e2e"], concatenated(distance, emb, idx_a, idx_b), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["cos"], F.cosine_similarity(emb[idx_a], emb[idx_b]), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["fus"], fuse(scores["e2e"], scores["cos"]))


def test_bf16_autocast_stays_close_to_fp32(device):
    distance = make_distance(device, n_hidden=1)
    emb = torch.randn(30, EMB, device=device)
    labels = torch.arange(30, device=device) % 3
    exact, _ = score_all_pairs(distance, emb, labels)
    mixed, _ = score_all_pairs(distance, emb, labels, amp=True, chunk_elements=50 * HIDDEN * 2)
    assert mixed["e2e"].dtype == torch.float32
    assert float((mixed["e2e"] - exact["e2e"]).abs().max()) < 2e-2


def test_degenerate_sizes(device):
    distance = make_distance(device)
    scores, target = score_all_pairs(distance, torch.randn(1, EMB, device=device), torch.zeros(1, device=device))
    assert scores["e2e"].numel() == 0 and target.numel() == 0
    empty = score_trials(distance, torch.randn(3, EMB, device=device), [], [])
    assert empty["e2e"].numel() == 0
    assert pair_chunk(distance, torch.device("cpu"), chunk_elements=1) == 1


def test_score_file_lines_and_metrics_json(tmp_path):
    path = tmp_path / "scores.out"
    scores = {name: torch.tensor([0.25, 0.5]) for name in ("e2e", "cos", "fus")}
    scores["e2e_logit"] = torch.tensor([-12.345678, 3e-5])
    write_score_file(str(path), ["a", "b"], ["c", "d"], scores, np.array([True, False]), metrics={"eer": 0.5})
    assert path.read_text().splitlines() == [
        "# enroll test e2e cos fus e2e_logit label",
        "a c 0.250000 0.250000 0.250000 -12.34568 target",
        "b d 0.500000 0.500000 0.500000 3e-05 nontarget",
    ]
    assert json.loads((tmp_path / "scores.out.json").read_text()) == {"eer": 0.5}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
