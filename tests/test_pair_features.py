"""The learned distance's pair-feature variants (models.verifier.PAIR_FEATURES), the cosine-anchored `cos` above all:
an untrained cos head is an increasing affine map of cosine (cosine's EER exactly), every variant's projected
(fast) form equals its naive per-pair form, cos is exactly symmetric, its correction penalty is what it says, and
it trains, checkpoints and exports to ONNX."""

import itertools

import numpy as np
import pytest
import torch
from tiny_data import model_config

import models
from e2e_verification import metrics, training
from e2e_verification.checkpoints import load_model, save_checkpoint
from e2e_verification.scoring import score_all_pairs, score_trials
from losses import pair_loss
from models.verifier import COS_OFFSET, COS_SCALE, PAIR_FEATURES, CosineDistanceHead, LearnedDistance

EMB, HIDDEN = 12, 10


def clustered(n=60, classes=6, seed=0, dtype=torch.float32):
    """Embeddings (n, EMB) around `classes` random centres (overlapping, so the EER is neither 0 nor 0.5), labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, EMB, generator=gen, dtype=dtype)
    return centres[labels] + 1.2 * torch.randn(n, EMB, generator=gen, dtype=dtype), labels


def trained_like(distance, seed=0):
    """Give every head a non-zero correction and moved a, b (as training would), so that tests can tell g apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in distance.heads:
            last = head.rest[-1]
            last.weight.copy_(0.5 * torch.randn(last.weight.shape, generator=gen))
            last.bias.copy_(0.5 * torch.randn(last.bias.shape, generator=gen))
            if isinstance(head, CosineDistanceHead):
                head.scale.add_(3.0 * torch.rand((), generator=gen))
                head.offset.sub_(torch.rand((), generator=gen))
    return distance


def corrections(distance, a, b):
    """g(a, b) of every head by hand: (heads, pairs), the logit less a * cos + b."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=0)
    with torch.no_grad():
        return distance(a, b) - torch.stack([h.scale * cos + h.offset for h in distance.heads])


@pytest.mark.parametrize("n_hidden", [1, 3])
def test_untrained_cos_is_affine_in_cosine_with_cosines_eer(n_hidden, device):
    torch.manual_seed(0)
    distance = LearnedDistance(EMB, HIDDEN, n_hidden, 0.25, 3, pair_features="cos").to(device)
    emb, labels = clustered()
    emb, labels = emb.to(device), labels.to(device)
    distance.train()  # dropout on: the zero last layer still gives g = 0
    idx_a, idx_b = torch.triu_indices(len(emb), len(emb), 1, device=device)
    with torch.no_grad():
        assert torch.equal(corrections(distance, emb[idx_a], emb[idx_b]).abs().max().cpu(), torch.tensor(0.0))
    scores, target = score_all_pairs(distance, emb, labels, chunk_elements=7 * HIDDEN)
    torch.testing.assert_close(scores["e2e_logit"], COS_SCALE * scores["cos"] + COS_OFFSET, atol=1e-5, rtol=0)
    order = torch.argsort(scores["cos"])
    assert bool((scores["e2e_logit"][order].diff() >= 0).all()), "not increasing in cosine"
    eer = {name: metrics.compute_eer(scores[name].cpu(), target.cpu()) for name in ("cos", "e2e_logit", "e2e")}
    assert 0.05 < eer["cos"] < 0.45, eer  # a real test: neither separable nor chance
    assert eer["e2e_logit"] == eer["e2e"] == eer["cos"], eer
    concat = LearnedDistance(EMB, HIDDEN, n_hidden, 0.25, 3).to(device)  # a control: the test can tell
    other, _ = score_all_pairs(concat, emb, labels)
    assert metrics.compute_eer(other["e2e_logit"].cpu(), target.cpu()) != eer["cos"]


@pytest.mark.parametrize("pair_features", list(PAIR_FEATURES))
def test_projected_equals_naive_in_float64(pair_features):
    """The fast form (blocks of all pairs by broadcasting slices, aligned trials by index) is the naive form up to
    float64 rounding, with a non-zero correction."""
    torch.manual_seed(1)
    distance = trained_like(LearnedDistance(EMB, HIDDEN, 2, 0.3, 2, pair_features=pair_features)).double().eval()
    emb = clustered(17, dtype=torch.float64)[0] * 3
    with torch.no_grad():
        projected = distance.project(emb)
        block = distance.projected_logits(projected, (slice(2, 9), None), (None, slice(5, None)))
        rows, cols = torch.meshgrid(torch.arange(2, 9), torch.arange(5, 17), indexing="ij")
        naive = distance(emb[rows.flatten()], emb[cols.flatten()]).view(2, 7, 12)
        torch.testing.assert_close(block, naive, atol=1e-12, rtol=0)
        idx_a, idx_b = torch.randint(0, 17, (40,)), torch.randint(0, 17, (40,))
        trials = distance.projected_logits(projected, idx_a, idx_b)
        torch.testing.assert_close(trials, distance(emb[idx_a], emb[idx_b]), atol=1e-12, rtol=0)
        assert naive.std() > 0.1  # the logits vary: the comparison means something


@pytest.mark.parametrize("chunk_elements", [1, 5 * (HIDDEN + 1), None])
def test_cos_scoring_matches_naive_in_float32(chunk_elements, device):
    torch.manual_seed(2)
    distance = trained_like(LearnedDistance(EMB, HIDDEN, 2, 0.3, 2, pair_features="cos")).to(device).eval()
    emb, labels = clustered(17)
    emb, labels = emb.to(device) * 3, labels.to(device)
    pairs = torch.tensor(list(itertools.combinations(range(17), 2)), device=device)
    with torch.no_grad():
        naive = distance(emb[pairs[:, 0]], emb[pairs[:, 1]])
    scores, target = score_all_pairs(distance, emb, labels, chunk_elements=chunk_elements)
    torch.testing.assert_close(scores["e2e_logit"], naive.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scores["e2e"], torch.sigmoid(naive).mean(0), atol=1e-6, rtol=0)
    assert torch.equal(target, labels[pairs[:, 0]] == labels[pairs[:, 1]])
    idx_a, idx_b = torch.randint(0, 17, (60,)), torch.randint(0, 17, (60,))
    trials = score_trials(distance, emb, idx_a.numpy(), idx_b.numpy(), chunk_elements=chunk_elements)
    with torch.no_grad():
        naive = distance(emb[idx_a.to(device)], emb[idx_b.to(device)])
    torch.testing.assert_close(trials["e2e_logit"], naive.mean(0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_hidden", [1, 3])
def test_cos_is_exactly_symmetric(n_hidden, device):
    torch.manual_seed(3)
    distance = trained_like(LearnedDistance(EMB, HIDDEN, n_hidden, 0.0, 2, pair_features="cos")).to(device).eval()
    a, b = torch.randn(50, EMB, device=device), torch.randn(50, EMB, device=device)
    emb, idx = torch.cat([a, b]), torch.arange(50, device=device)
    with torch.no_grad():
        assert torch.equal(distance(a, b), distance(b, a))
        assert torch.equal(distance.pair_logits(emb, idx, idx + 50), distance.pair_logits(emb, idx + 50, idx))
        assert corrections(distance, a, b).abs().max() > 0.1  # g is in play


def test_regulariser_is_the_mean_squared_correction_summed_over_heads():
    torch.manual_seed(4)
    distance = trained_like(LearnedDistance(EMB, HIDDEN, 2, 0.0, 3, pair_features="cos")).train()
    emb = torch.randn(9, EMB)
    idx_a, idx_b = torch.triu_indices(9, 9, 1)
    distance.pair_logits(emb, idx_a, idx_b)
    got = distance.regulariser()
    want = corrections(distance, emb[idx_a], emb[idx_b]).square().mean(1).sum()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    got.backward()
    assert all(p.grad is not None for h in distance.heads for p in h.rest.parameters())
    assert all(h.scale.grad is None and h.offset.grad is None for h in distance.heads)  # g's penalty only
    with torch.no_grad():  # scoring leaves no penalty (and holds no graph)
        distance.pair_logits(emb, idx_a, idx_b)
    assert distance.regulariser().item() == 0.0
    for name in ("concat", "sym"):  # no correction, no penalty
        other = LearnedDistance(EMB, HIDDEN, 2, 0.0, 2, pair_features=name)
        other.pair_logits(emb, idx_a, idx_b)
        assert other.regulariser().item() == 0.0


def test_cos_trains_every_parameter_from_the_pair_loss():
    """At initialisation the pair loss moves a, b and g's last layer; after one step g's first layers too."""
    torch.manual_seed(5)
    distance = LearnedDistance(EMB, HIDDEN, 2, 0.0, 1, pair_features="cos").train()
    emb, labels = clustered(24)
    idx_a, idx_b = torch.triu_indices(24, 24, 1)
    opt = torch.optim.SGD(distance.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        loss = pair_loss(distance.pair_logits(emb, idx_a, idx_b), labels[idx_a] == labels[idx_b])
        (loss + 1e-2 * distance.regulariser()).backward()
        opt.step()
    head = distance.heads[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distance.parameters())
    assert head.scale.item() != COS_SCALE and head.offset.item() != COS_OFFSET


def test_cos_keeps_the_cosine_in_float32_under_autocast():
    torch.manual_seed(6)
    distance = LearnedDistance(EMB, HIDDEN, 1, 0.0, 1, pair_features="cos").eval()
    emb, labels = clustered(30)
    exact, _ = score_all_pairs(distance, emb, labels)
    amp, _ = score_all_pairs(distance, emb, labels, amp=True)  # bfloat16 on the CPU
    torch.testing.assert_close(amp["e2e_logit"], exact["e2e_logit"], atol=1e-5, rtol=0)


def test_cos_refuses_a_random_projection():
    with pytest.raises(ValueError, match="rproj"):
        LearnedDistance(EMB, HIDDEN, pair_features="cos", rproj_size=8)


def test_cos_checkpoint_round_trip_and_train_flag(tmp_path):
    torch.manual_seed(7)
    config = dict(model_config("densenet", n_classes=3, encoder_args={"in_channels": 1, "stem": "cifar"}))
    config.update(pair_features="cos", ndiscriminators=2)
    model = models.build_model(config).eval()
    trained_like(model.distance)
    path = str(tmp_path / "cos.pt")
    save_checkpoint(path, {"model_config": model.config, "model_state": model.state_dict()})
    loaded = load_model(path)
    assert loaded.distance.pair_features == "cos"
    assert all(isinstance(h, CosineDistanceHead) for h in loaded.distance.heads)
    a, b = torch.randn(5, loaded.encoder.embedding_size), torch.randn(5, loaded.encoder.embedding_size)
    with torch.no_grad():
        assert torch.equal(loaded.distance(a, b), model.distance(a, b))
    args = training.build_parser().parse_args(["--pair-features", "cos"])
    assert args.pair_features == "cos"


@pytest.mark.parametrize("pair_features", list(PAIR_FEATURES))
def test_distance_graph_exports_to_onnx(pair_features, tmp_path):
    """The distance graph of every variant (what export.py writes as distance.onnx) matches PyTorch in onnxruntime,
    for any number of pairs."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from e2e_verification.onnx_graphs import DistanceGraph, cpu_session, export_graph

    torch.manual_seed(8)
    distance = trained_like(LearnedDistance(EMB, HIDDEN, 2, 0.25, 2, pair_features=pair_features)).eval()
    graph, path = DistanceGraph(distance).eval(), str(tmp_path / "distance.onnx")
    emb = torch.randn(4, EMB)
    axes = {"enroll": {0: "pairs"}, "test": {0: "pairs"}}
    export_graph(graph, [emb, emb.flip(0)], path, ["enroll", "test"], ["logit", "probability"], axes, 17, "torchscript")
    session = cpu_session(path)
    for pairs in (1, 7, 200):
        a, b = torch.randn(pairs, EMB) * 3, torch.randn(pairs, EMB) * 3
        logit, prob = session.run(None, {"enroll": a.numpy(), "test": b.numpy()})
        with torch.no_grad():
            ref_logit, ref_prob = graph(a, b)
        np.testing.assert_allclose(logit, ref_logit.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(prob, ref_prob.numpy(), rtol=0, atol=1e-6)
