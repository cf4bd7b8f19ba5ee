"""Safe loading: a checkpoint carrying a pickle payload is refused by every script and the payload never runs."""

import ast
import glob
import os
import subprocess
import sys

import pytest
import torch
from tiny_data import PicklePayload, make_image_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_malicious_checkpoint(path, marker):
    """A file shaped like a checkpoint (the keys eval.py looks for) whose pickle calls open()."""
    state = {"model_config": {"model": "resnet"}, "model_state": {}, "epoch": 1, "payload": PicklePayload(marker)}
    torch.save(state, path)
    return path


@pytest.fixture
def trap(tmp_path):
    marker = str(tmp_path / "PAYLOAD_RAN")
    return write_malicious_checkpoint(str(tmp_path / "checkpoint_1ep.pt"), marker), marker


def run_script(name, *argv):
    cmd = [sys.executable, os.path.join(ROOT, name), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_refused(done, marker, path):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"refusing to load {path}" in lines[0] and "weights only" in lines[0], lines[0]
    assert not os.path.exists(marker)


def test_the_payload_is_live(tmp_path):
    """Control: an unsafe torch.load really runs the payload, so the refusals below mean something."""
    marker = str(tmp_path / "control")
    path = write_malicious_checkpoint(str(tmp_path / "control.pt"), marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_eval_refuses_a_pickle_payload(trap, tmp_path):
    path, marker = trap
    done = run_script("eval.py", "--cp-path", path, "--device", "cpu", "--out-path", str(tmp_path / "s.out"))
    assert_refused(done, marker, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1ep.pt"]


def test_train_resume_refuses_a_pickle_payload(trap, tmp_path):
    path, marker = trap
    data = make_image_tree(str(tmp_path / "images"), n_classes=2, per_class=10)
    argv = ["--data-path", data, "--checkpoint-path", str(tmp_path), "--checkpoint-epoch", "1", "--device", "cpu"]
    done = run_script("train.py", *argv, "--epochs", "2", "--verbose", "0")
    assert_refused(done, marker, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1ep.pt", "images"]  # not even args.json


def test_embed_refuses_a_pickle_payload(trap, tmp_path):
    if not os.path.exists(os.path.join(ROOT, "embed.py")):
        pytest.fail("embed.py is missing")
    path, marker = trap
    out = str(tmp_path / "emb")
    done = run_script("embed.py", "--data", str(tmp_path / "feats.scp"), "--cp-path", path, "--out-path", out)
    assert_refused(done, marker, path)
    assert not os.path.exists(out)


def torch_load_calls():
    """(file, line, has weights_only=True) for every torch.load call in the project's Python files."""
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
    for path in sorted(f for f in files if os.sep + ".venv" not in f and os.sep + "tests" + os.sep not in f):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                yield os.path.relpath(path, ROOT), node.lineno, safe


def test_every_torch_load_is_weights_only():
    calls = list(torch_load_calls())
    assert (os.path.join("e2e_verification", "checkpoints.py"), True) in {(f, s) for f, _, s in calls}
    unsafe = [f"{f}:{line}" for f, line, safe in calls if not safe]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
