"""The extension contracts: encoders (models.base), classification heads and pair losses (losses).

Every registered encoder's shapes, finiteness and gradients are checked in test_models.py (it iterates
the registry and asserts `contract_errors`); here: that the contracts are enforced, that the registries
need no second list, and that every registered head and pair loss keeps its call signature.
"""

import os
import sys

import pytest
import torch
from torch import nn

import models
from e2e_verification import hp_space
from losses import DEFAULT_PAIR_LOSS, HEADS, PAIR_LOSSES, build_head, pair_loss


def test_every_module_of_the_models_package_is_discovered():
    models.encoder_names()
    folder = os.path.dirname(models.__file__)
    files = [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"]
    assert files and all(f"models.{name}" in sys.modules for name in files)
    assert {"TDNN", "resnet", "ECAPA_TDNN"} <= set(models.encoder_names())


def test_registering_a_class_that_is_not_an_encoder_is_refused():
    with pytest.raises(TypeError, match="must subclass models.base.Encoder"):
        models.register_encoder("not_an_encoder", "image")(nn.Linear)
    assert "not_an_encoder" not in models.ENCODERS


class _NoLatent(models.Encoder):
    def __init__(self):
        super().__init__()
        self.embedding_size = 4

    def forward(self, x):
        return x, x


def test_an_encoder_built_without_its_sizes_is_refused():
    models.register_encoder("broken_encoder", "image")(lambda: _NoLatent())
    try:
        with pytest.raises(TypeError, match="latent_size must be an int >= 1"):
            models.create_encoder("broken_encoder")
    finally:
        del models.ENCODERS["broken_encoder"]


@pytest.mark.parametrize("name", models.encoder_names("speech"))
def test_speech_encoders_take_min_frames(name):
    torch.manual_seed(0)
    encoder = models.create_encoder(name, ncoef=8, latent_size=4).eval()
    with torch.no_grad():
        emb, latent = encoder(torch.randn(2, 8, encoder.min_frames))
    assert emb.shape == (2, encoder.embedding_size) and latent.shape == (2, 4)
    assert torch.isfinite(emb).all() and torch.isfinite(latent).all()


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_keeps_the_head_contract(name):
    cls = HEADS[name]
    assert isinstance(cls.takes_margin, bool) and isinstance(cls.hp_search, bool)
    torch.manual_seed(0)
    head = build_head(name, 6, 5, margin=0.2, scale=10.0, softmax_scale=2.0)
    x, labels = torch.randn(4, 6, requires_grad=True), torch.tensor([0, 1, 4, 1])
    train, infer = head(x, labels), head(x)
    assert train.shape == infer.shape == (4, 5) and torch.isfinite(train).all()
    train.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in head.parameters()) and x.grad is not None


def test_searched_heads_come_from_the_registry_in_the_seed_order():
    assert hp_space.SEARCHED_HEADS == ("softmax", "am_softmax")
    assert set(hp_space.SEARCHED_HEADS) == {n for n, c in HEADS.items() if c.hp_search}
    for space in hp_space.SPACES.values():
        assert space["softmax"] == ["choice", ["softmax", "am_softmax"]]


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_every_pair_loss_keeps_the_pair_loss_contract(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, requires_grad=True)  # (n_heads, pairs)
    same = torch.tensor([True, False, False, True, False, False])
    loss = PAIR_LOSSES[name](logits, same, 0.1)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_the_default_pair_loss_is_the_balanced_bce():
    assert PAIR_LOSSES[DEFAULT_PAIR_LOSS] is pair_loss and DEFAULT_PAIR_LOSS == "bce"


def test_no_two_classes_share_a_name():
    """A class name means one thing in the repository (a reader meeting `Verifier` knows which one)."""
    import ast
    import collections
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=root, capture_output=True, text=True, check=True)
    where = collections.defaultdict(list)
    for path in files.stdout.split():
        with open(os.path.join(root, path)) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(path)
    assert len(where) > 20
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_the_readme_layout_map_names_every_command_and_library_module():
    """The README's layout map has a line for each root script and each module of the package."""
    import glob
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as handle:
        text = handle.read()
    layout = text[text.index("\n## Layout\n") :]
    layout = layout[: layout.index("\n## ", 1)]
    names = {m.group(1) for m in re.finditer(r"^\s*(\S+\.(?:py|sh))\s", layout, re.M)}
    scripts = glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*.sh"))
    wanted = {os.path.basename(p) for p in scripts}
    package = glob.glob(os.path.join(root, "e2e_verification", "*.py"))
    wanted |= {os.path.basename(p) for p in package if not p.endswith("__init__.py")}
    assert wanted - names == set(), f"not in the README's layout map: {sorted(wanted - names)}"
