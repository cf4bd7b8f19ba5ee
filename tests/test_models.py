"""Every registered encoder through the same checks (timm's habit), and the learned-distance heads."""

import pytest
import torch

import models
from models.verifier import DistanceHead, LearnedDistance

IMAGE_INPUTS = {"cifar": (2, 3, 32, 32), "imagenet": (2, 3, 84, 84), "digits": (2, 1, 8, 8)}


def image_cases():
    for name in models.encoder_names("image"):
        for kind, shape in IMAGE_INPUTS.items():
            stem = "imagenet" if kind == "imagenet" else "cifar"
            yield pytest.param(name, {"in_channels": shape[1], "stem": stem}, shape, id=f"{name}-{kind}")


def speech_cases():
    for name in models.encoder_names("speech"):
        yield pytest.param(name, {"ncoef": 30, "latent_size": 16}, (2, 30, 120), id=name)


def config(name, encoder_args, softmax="am_softmax", ndisc=2, rproj=0):
    return {
        "model": name,
        "encoder_args": encoder_args,
        "n_classes": 3,
        "softmax": softmax,
        "margin": 0.35,
        "scale": 30.0,
        "hidden_size": 16,
        "n_hidden": 2,
        "dropout_prob": 0.1,
        "ndiscriminators": ndisc,
        "rproj_size": rproj,
        "trainable_rproj": False,
    }


@pytest.mark.parametrize("name,encoder_args,shape", [*image_cases(), *speech_cases()])
def test_encoder_shapes_finite_and_every_parameter_learns(name, encoder_args, shape, device):
    torch.manual_seed(0)
    model = models.build_model(config(name, encoder_args)).to(device).train()
    assert not models.contract_errors(model.encoder)  # subclasses models.base.Encoder, sizes set
    x = torch.randn(*shape, device=device)
    emb, latent = model(x)
    assert emb.shape == (shape[0], model.encoder.embedding_size)
    assert latent.shape == (shape[0], model.encoder.latent_size)
    assert torch.isfinite(emb).all() and torch.isfinite(latent).all()
    labels = torch.tensor([0, 1], device=device)
    logits, pair_logits, same = model(x, labels)
    assert logits.shape == (2, 3) and pair_logits.shape == (2, 1) and same.tolist() == [False]
    (logits.logsumexp(1).sum() + pair_logits.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


def test_random_projection_is_a_frozen_buffer_unless_asked():
    head = DistanceHead(8, 16, 1, 0.0, rproj_size=6)
    assert "proj" in dict(head.named_buffers()) and "proj" not in dict(head.named_parameters())
    assert torch.isclose(head.proj.norm(), torch.tensor(1.0))
    trainable = DistanceHead(8, 16, 1, 0.0, rproj_size=6, trainable_rproj=True)
    assert "proj" in dict(trainable.named_parameters())


def test_ensemble_score_is_mean_of_head_probabilities():
    torch.manual_seed(0)
    dist = LearnedDistance(8, hidden_size=16, n_hidden=2, dropout_prob=0.0, ndiscriminators=3).eval()
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    expected = torch.stack([torch.sigmoid(h(a, b)) for h in dist.heads]).mean(0)
    torch.testing.assert_close(dist.score(a, b), expected)


def test_checkpoint_config_rebuilds_the_same_model(tmp_path):
    from e2e_verification.checkpoints import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = models.build_model(config("resnet", {"in_channels": 1, "stem": "cifar"}, rproj=4)).eval()
    path = str(tmp_path / "cp.pt")
    save_checkpoint(path, {"model_config": model.config, "model_state": model.state_dict()})
    state = load_checkpoint(path)
    rebuilt = models.build_model(state["model_config"])
    rebuilt.load_state_dict(state["model_state"])
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval().embed(x), model.embed(x))


# The seed's encoders end in ReLU(BN(Linear -> 512)); these end in their published embedding layers.
PUBLISHED_EMBEDDINGS = {"ECAPA_TDNN": 192, "ResNet34": 256}


# resnet_large differs from resnet_mfcc only in depth; leaving it out saves the slowest case.
@pytest.mark.parametrize("name", [n for n in models.encoder_names("speech") if n != "resnet_large"])
def test_speech_encoders_take_both_layouts_and_draw_no_random_numbers(name, device):
    torch.manual_seed(0)
    encoder = models.create_encoder(name, ncoef=8, latent_size=8).to(device).train()
    x = torch.randn(3, 8, 12, device=device)
    state = torch.get_rng_state()
    emb, latent = encoder(x)
    assert torch.equal(torch.get_rng_state(), state), "the forward pass must not draw random numbers on the CPU"
    with torch.no_grad():
        encoder.eval()
        torch.testing.assert_close(encoder(x.unsqueeze(1))[0], encoder(x)[0])
    assert latent.shape == (3, 8) and emb.shape == (3, encoder.embedding_size)
    if name in PUBLISHED_EMBEDDINGS:
        assert encoder.embedding_size == PUBLISHED_EMBEDDINGS[name]
    else:
        assert encoder.embedding_size == 512 and (emb >= 0).all()


def test_statistics_poolings_match_hand_computation():
    from models.pooling import STD_EPS, AttentiveStatsPool, StatsPool

    x = torch.randn(2, 4, 9, dtype=torch.float32)
    out = StatsPool()(x)
    torch.testing.assert_close(out[:, :4], x.mean(-1))
    torch.testing.assert_close(out[:, 4:], (x.var(-1, unbiased=False) + STD_EPS).sqrt())
    pool = AttentiveStatsPool(4)
    alpha = torch.softmax(torch.tanh(torch.einsum("bct,c->bt", x, pool.weight)), dim=-1)
    for b in range(2):
        mean = (alpha[b] * x[b]).sum(-1)
        var = (alpha[b] * (x[b] - mean[:, None]) ** 2).sum(-1)
        torch.testing.assert_close(pool(x)[b], torch.cat([mean, (var + STD_EPS).sqrt()]))
    constant = torch.ones(1, 4, 9, requires_grad=True)
    pool(constant).sum().backward()
    assert torch.isfinite(constant.grad).all()


def test_the_parameter_counts_docs_speech_shows_are_the_models():
    """docs/speech.md's table of the literature encoders (and its MFCC sentence) counts the encoders as built here,
    without the `mu` projection to --latent-size."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "speech.md")) as handle:
        text = handle.read()

    def millions(name, **kwargs):
        encoder = models.create_encoder(name, **kwargs)
        return round(sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("mu.")) / 1e6, 2)

    assert re.search(r"\| `ECAPA_TDNN` \| ECAPA-TDNN, C = 512.*?\| ([\d.]+) M \|", text).group(1) == str(
        millions("ECAPA_TDNN", ncoef=80)
    )
    assert re.search(r"\| `ECAPA_TDNN` with C = 1024 \|.*?\| ([\d.]+) M \|", text).group(1) == str(
        millions("ECAPA_TDNN", ncoef=80, channels=1024)
    )
    assert re.search(r"\| `ResNet34` +\|.*?\| ([\d.]+) M \|", text).group(1) == str(millions("ResNet34", ncoef=80))
    mfcc = re.search(r"\(ECAPA-TDNN: ([\d.]+) M, ResNet34: ([\d.]+) M at the MFCC default", text)
    assert mfcc.groups() == (str(millions("ECAPA_TDNN", ncoef=30)), str(millions("ResNet34", ncoef=30)))
