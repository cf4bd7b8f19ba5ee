"""export.py: the ONNX graphs compute what the PyTorch model computes, on any batch, length and number of pairs.

Checkpoints are small real ones in TrainLoop's state layout, with BatchNorm statistics gathered from data
(as training leaves them), so embeddings have a trained model's scale and a 1e-4 tolerance means something.
"""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_data import PicklePayload, model_config, write_checkpoint

import export
import models
from e2e_verification.checkpoints import load_model, save_checkpoint
from utils import OUTPUT_MARKER, UserError

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NCOEF = 30
IMAGE_SIZE = 16
FRAMES = (60, 137, 300)
BATCHES = (1, 3)
TOL = 1e-4
# name -> encoder_args; speech models take NCOEF coefficients, the image one IMAGE_SIZE x IMAGE_SIZE RGB.
CASES = {
    "densenet": {"in_channels": 3, "stem": "cifar"},
    "TDNN": {"ncoef": NCOEF, "latent_size": 16},
    "resnet_small": {"ncoef": NCOEF, "latent_size": 16},
    "resnet_lstm": {"ncoef": NCOEF, "latent_size": 16},
}
# resnet_lstm (50 layers, then a BiLSTM) amplifies float32 rounding: in PyTorch alone, noise of 1e-7 (relative)
# on its stem output moves its embeddings (max ~4) by ~6e-5, so onnxruntime's different kernel order ends up
# ~1e-4 away. Its embeddings are checked to 3e-4 (relative 1e-4 of their size); the other models to 1e-4.
EMB_TOL = {"resnet_lstm": 3e-4}


def features(name, batch, frames, seed=0):
    """A float32 input batch for encoder `name`: (batch, NCOEF, frames) or (batch, 3, IMAGE_SIZE, IMAGE_SIZE)."""
    gen = torch.Generator().manual_seed(seed)
    if models.encoder_domain(name) == "speech":
        return torch.randn(batch, NCOEF, frames, generator=gen) + 0.5
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


def write_trained_like_checkpoint(path, name, seed=0):
    """A checkpoint as TrainLoop.state() writes it, whose BatchNorm layers hold statistics of sample batches.

    Two discriminator heads of two hidden layers, so that 'mean of the heads' sigmoids' differs from
    'sigmoid of the mean logit' and a graph that mixed them up would fail.
    """
    torch.manual_seed(seed)
    config = dict(model_config(name, n_classes=5, encoder_args=CASES[name]), ndiscriminators=2, n_hidden=2)
    net = models.build_model(config)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average over the batches below
    net.train()
    with torch.no_grad():
        for i in range(4):
            net(features(name, 8, 100 + 20 * i, seed=100 + i))
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    state = {
        "format": 1,
        "model_config": net.config,
        "model_state": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "scheduler_state": sched.state_dict(),
        "scheduler_kind": "plateau",
        "epoch": 3,
        "total_iters": 12,
        "history": {},
        "best": {"e2e": 0.5, "cos": 0.5},
        "args": {"model": name},
    }
    save_checkpoint(path, state)
    return path


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(encoder name, PyTorch model, export folder) of one exported checkpoint (TorchScript files too)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"export_{name}")
    cp = write_trained_like_checkpoint(str(root / "cp.pt"), name)
    out = root / "onnx"
    argv = ["--cp-path", cp, "--out", str(out), "--torchscript"]
    if models.encoder_domain(name) == "image":
        argv += ["--image-size", str(IMAGE_SIZE)]  # a speech model refuses it
    assert export.main(argv) == 0
    return name, load_model(cp), out


def test_export_json_describes_the_graphs(exported):
    name, model, out = exported
    info = json.loads((out / "export.json").read_text())
    assert info["model"] == name and info["model_config"] == json.loads(json.dumps(model.config))
    assert info["embedding_size"] == model.encoder.embedding_size and info["opset"] == 17
    assert info["exporter"] == "torchscript" and sorted(info["graphs"]) == ["distance.onnx", "encoder.onnx"]
    parity = info["parity_max_abs_diff"]
    assert parity["encoder"] < EMB_TOL.get(name, TOL) and parity["logit"] < TOL and parity["probability"] < TOL
    files = [OUTPUT_MARKER, "distance.onnx", "distance.pt", "encoder.onnx", "encoder.pt", "export.json"]
    assert sorted(os.listdir(out)) == files
    assert not [f for f in os.listdir(out.parent) if f.startswith(".onnx.")], "a temporary folder was left behind"
    dims = lambda values: [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]  # noqa: E731
    graph = onnx.load(str(out / "encoder.onnx")).graph
    emb = model.encoder.embedding_size
    if models.encoder_domain(name) == "speech":
        assert info["input"]["ncoef"] == NCOEF
        assert dims(graph.input) == [["batch", NCOEF, "frames"]]
    else:
        assert info["input"]["channels"] == 3 and info["input"]["size"] == [IMAGE_SIZE, IMAGE_SIZE]
        assert dims(graph.input) == [["batch", 3, IMAGE_SIZE, IMAGE_SIZE]]
    assert dims(graph.output) == [["batch", emb]]
    graph = onnx.load(str(out / "distance.onnx")).graph
    assert [v.name for v in graph.input] == ["enroll", "test"] and [v.name for v in graph.output] == [
        "logit",
        "probability",
    ]
    assert dims(graph.input) == [["pairs", emb]] * 2 and dims(graph.output) == [["pairs"]] * 2


def shapes(name):
    """(batch, frames) combinations: every batch size with every length (one length for images)."""
    lengths = FRAMES if models.encoder_domain(name) == "speech" else (IMAGE_SIZE,)
    return [(batch, frames) for batch in BATCHES for frames in lengths]


def test_graphs_match_pytorch_on_every_batch_and_length(exported):
    name, model, out = exported
    encoder, distance = session(out / "encoder.onnx"), session(out / "distance.onnx")
    for seed, (batch, frames) in enumerate(shapes(name)):
        x = features(name, batch, frames, seed=seed)
        with torch.no_grad():
            ref = model.embed(x)
        got = encoder.run(["embedding"], {"features": x.numpy()})[0]
        assert got.shape == tuple(ref.shape)
        tol = EMB_TOL.get(name, TOL)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=tol, err_msg=f"{name} {batch}x{frames}")
        assert float(ref.abs().max()) > 10 * TOL, "embeddings too small for the tolerance to test anything"
        # every ordered pair of the batch with itself and the others, and a pair of the batch with itself
        idx_a, idx_b = torch.cartesian_prod(torch.arange(batch), torch.arange(batch)).t()
        a, b = ref[idx_a], ref[idx_b]
        with torch.no_grad():
            ref_logit, ref_prob = model.distance(a, b).mean(0), model.distance.score(a, b)
        logit, prob = distance.run(["logit", "probability"], {"enroll": a.numpy(), "test": b.numpy()})
        np.testing.assert_allclose(logit, ref_logit.numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(prob, ref_prob.numpy(), rtol=0, atol=TOL)
        # end to end: onnxruntime embeddings into the onnxruntime distance
        e2e = distance.run(["probability"], {"enroll": got[idx_a.numpy()], "test": got[idx_b.numpy()]})[0]
        np.testing.assert_allclose(e2e, ref_prob.numpy(), rtol=0, atol=TOL)


def test_probability_is_the_mean_of_the_heads_sigmoids(exported):
    """With two heads, `probability` is mean(sigmoid(head logits)), which sigmoid(`logit`) is not."""
    name, model, out = exported
    gen = torch.Generator().manual_seed(7)
    a, b = (30 * torch.randn(4, model.encoder.embedding_size, generator=gen) for _ in range(2))
    logit, prob = session(out / "distance.onnx").run(None, {"enroll": a.numpy(), "test": b.numpy()})
    with torch.no_grad():
        heads = model.distance(a, b)
    assert heads.shape[0] == 2
    np.testing.assert_allclose(prob, torch.sigmoid(heads).mean(0).numpy(), rtol=0, atol=TOL)
    assert np.abs(prob - 1 / (1 + np.exp(-logit))).max() > 10 * TOL


def test_distance_takes_any_number_of_pairs(exported):
    name, model, out = exported
    distance = session(out / "distance.onnx")
    emb_size = model.encoder.embedding_size
    gen = torch.Generator().manual_seed(1)
    for pairs in (1, 2, 17, 500):
        a, b = torch.randn(pairs, emb_size, generator=gen), torch.randn(pairs, emb_size, generator=gen)
        logit, prob = distance.run(None, {"enroll": a.numpy(), "test": b.numpy()})
        assert logit.shape == prob.shape == (pairs,)
        with torch.no_grad():
            np.testing.assert_allclose(logit, model.distance(a, b).mean(0).numpy(), rtol=0, atol=TOL)
            np.testing.assert_allclose(prob, model.distance.score(a, b).numpy(), rtol=0, atol=TOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_files_match_pytorch(exported):
    name, model, out = exported
    encoder, distance = torch.jit.load(str(out / "encoder.pt")), torch.jit.load(str(out / "distance.pt"))
    for batch, frames in shapes(name)[-2:]:
        x = features(name, batch, frames, seed=11)
        with torch.no_grad():
            ref, got = model.embed(x), encoder(x)
            torch.testing.assert_close(got, ref, rtol=0, atol=EMB_TOL.get(name, TOL))
            logit, prob = distance(ref, ref.flip(0))
            torch.testing.assert_close(prob, model.distance.score(ref, ref.flip(0)), rtol=0, atol=TOL)
            torch.testing.assert_close(logit, model.distance(ref, ref.flip(0)).mean(0), rtol=0, atol=TOL)


def every_other_encoder():
    """Registered encoders the cases above do not cover; the speech ResNets whose body resnet_lstm shares run only
    with -m slow."""
    slow = {"resnet_large", "resnet_mfcc", "resnet_stats"}
    names = [name for name in models.encoder_names() if name not in CASES]
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.mark.parametrize("name", every_other_encoder())
def test_every_registered_encoder_exports(name, tmp_path):
    """Each encoder exports with dynamic axes, and its built-in parity check (batch 3, 137 frames, against a
    trace at batch 2, 200 frames) holds. Untrained weights: embeddings can be large, so relative to their size."""
    speech = models.encoder_domain(name) == "speech"
    args = {"ncoef": NCOEF, "latent_size": 8} if speech else {"in_channels": 3, "stem": "cifar"}
    cp = write_checkpoint(str(tmp_path / "cp.pt"), name, encoder_args=args)
    assert export.main(["--cp-path", cp, "--out", str(tmp_path / "onnx")]) == 0
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["parity_max_abs_diff"]["encoder_relative"] < 1e-5, info["parity_max_abs_diff"]
    assert info["parity_max_abs_diff"]["probability"] < TOL, info["parity_max_abs_diff"]
    dims = [
        d.dim_param or d.dim_value
        for d in onnx.load(str(tmp_path / "onnx" / "encoder.onnx")).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == (["batch", NCOEF, "frames"] if speech else ["batch", 3, 32, 32])


@pytest.fixture(scope="module")
def tdnn_cp(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_tdnn")
    return write_trained_like_checkpoint(str(root / "tdnn.pt"), "TDNN")


def test_dynamo_exporter_matches_pytorch(tdnn_cp, tmp_path):
    """The torch.export-based exporter (--exporter dynamo) gives the same graphs, dynamic axes included."""
    out = tmp_path / "onnx"
    assert export.main(["--cp-path", tdnn_cp, "--out", str(out), "--exporter", "dynamo"]) == 0
    assert json.loads((out / "export.json").read_text())["opset"] == 18
    # no external data files
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "distance.onnx", "encoder.onnx", "export.json"]
    model, encoder = load_model(tdnn_cp), session(out / "encoder.onnx")
    for batch, frames in ((1, 60), (3, 300)):
        x = features("TDNN", batch, frames, seed=5)
        with torch.no_grad():
            ref = model.embed(x)
        np.testing.assert_allclose(encoder.run(None, {"features": x.numpy()})[0], ref.numpy(), rtol=0, atol=TOL)
    a, b = ref, ref.flip(0)
    prob = session(out / "distance.onnx").run(["probability"], {"enroll": a.numpy(), "test": b.numpy()})[0]
    np.testing.assert_allclose(prob, model.distance.score(a, b).detach().numpy(), rtol=0, atol=TOL)


def test_force_replaces_the_folder_atomically(tdnn_cp, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="exists and is not empty .*--force"):
        export.main(["--cp-path", tdnn_cp, "--out", str(out)])
    with pytest.raises(UserError, match="replaces only an earlier output of export"):
        export.main(["--cp-path", tdnn_cp, "--out", str(out), "--force"])
    assert os.listdir(out) == ["stale.txt"]
    (out / "export.json").write_text("{}")  # an export from before the output marker, with a file of its own
    assert export.main(["--cp-path", tdnn_cp, "--out", str(out), "--force"]) == 0
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "distance.onnx", "encoder.onnx", "export.json"]
    assert os.listdir(tmp_path) == ["onnx"], "temporary or old folders were left behind"


def test_bad_input_is_one_line(tdnn_cp, tmp_path):
    """Each mistake: one UserError line, and nothing written beside the output folder."""
    unsafe, marker = str(tmp_path / "unsafe.pt"), str(tmp_path / "PAYLOAD_RAN")
    torch.save({"model_config": {"model": "TDNN"}, "model_state": {}, "payload": PicklePayload(marker)}, unsafe)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "mine.txt").write_text("x")
    (tmp_path / "a_file").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    out = str(work / "onnx")
    cases = [
        (["--cp-path", str(tmp_path / "missing.pt"), "--out", out], "checkpoint not found"),
        (["--cp-path", unsafe, "--out", out], "refusing to load"),
        (["--cp-path", tdnn_cp, "--out", str(tmp_path / "exists")], "exists and is not empty"),
        (["--cp-path", tdnn_cp, "--out", str(tmp_path / "a_file"), "--force"], "is not a folder"),
        (
            ["--cp-path", tdnn_cp, "--out", str(tmp_path / "no" / "such" / "onnx")],
            "does not exist",
        ),
        (["--cp-path", tdnn_cp, "--out", out, "--opset", "9"], "--opset 9 is outside"),
        (["--cp-path", tdnn_cp, "--out", out, "--amp"], "--amp does not apply"),
        (["--cp-path", tdnn_cp], "required: --out"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            export.main(argv)
    assert not os.path.exists(marker)
    assert os.listdir(work) == []


def test_command_line_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "export.py"),
        "--cp-path",
        str(tmp_path / "nope.pt"),
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "exists and is not empty" in lines[0]


@pytest.mark.slow
def test_dynamo_failure_is_one_line_and_leaves_nothing(tmp_path):
    """resnet_lstm cannot be traced by torch.export with a dynamic time axis: a UserError, no folder left."""
    cp = write_checkpoint(str(tmp_path / "lstm.pt"), "resnet_lstm", encoder_args={"ncoef": NCOEF, "latent_size": 8})
    out = tmp_path / "onnx"
    with pytest.raises(UserError, match="the dynamo exporter cannot export resnet_lstm .*--exporter torchscript"):
        export.main(["--cp-path", cp, "--out", str(out), "--exporter", "dynamo"])
    assert sorted(os.listdir(tmp_path)) == ["lstm.pt"]


def test_bench_runs_and_agrees(capsys, monkeypatch, tmp_path):
    """bench/export_speed.py at tiny sizes: it runs and its parity check holds (no timing is asserted)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    bench = importlib.import_module("export_speed")
    argv = ["--speech-batch", "2", "--frames", "50", "--image-batch", "2", "--image-size", "8", "--repeats", "1"]
    argv += ["--out", str(tmp_path / "performance.md")]  # never the committed page
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("TDNN", "resnet"):
        line = next(line for line in out.splitlines() if line.startswith(f"{name}: batch 2"))
        assert float(line.rsplit("relative ", 1)[1].rstrip(")")) < TOL, line
        assert f"{name} embedding, onnxruntime: " in out and "vs PyTorch" in out
