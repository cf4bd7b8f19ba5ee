"""Reliability of verify.py, export.py, trials files and checkpoint loading (items 9, 11, 12, 13, 15, 25, 30 of
the adversarial pass, and the shared output-folder guard and provenance for export.py and verify.py).

A user's mistake is one line on stderr and exit status 2, no traceback, nothing written. Most cases run the
command's main through utils.cli in-process (what the script's `cli(main)` does); a few run the real script in
a fresh interpreter, as tests/test_bad_input.py does.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import model_config, write_checkpoint, write_kaldi_dir

import export
import models
import verify
from e2e_verification import calibration, speech_data
from e2e_verification.checkpoints import load_checkpoint, load_model, model_provenance, save_checkpoint
from e2e_verification.frontend import FrontEnd
from e2e_verification.image_input import ImageInput
from utils import OUTPUT_MARKER, UserError, cli, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 8000
NCOEF = 20


def write_wav(path, samples, rate=RATE):
    """int16 mono PCM wav."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def write_image_checkpoint(path, record, seed=0):
    """A small image resnet (width 8) whose checkpoint records its training input `record` (an ImageInput)."""
    path = write_checkpoint(
        str(path), "resnet", encoder_args={"in_channels": record.channels, "stem": "cifar", "width": 8}, seed=seed
    )
    state = load_checkpoint(path)
    state["model_config"]["image_input"] = record.to_dict()
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Shared inputs (read-only for the cases): $CP, a TDNN on 8 kHz MFCCs of 4 speakers, two wavs; $CI, the
    digits demo's resnet at --width 8 (1x8x8 input); an image checkpoint trained on 6x10 images; a Kaldi dir."""
    root = tmp_path_factory.mktemp("reliability_verify")
    paths = {"root": str(root)}
    torch.manual_seed(0)
    front_end = FrontEnd.mfcc(NCOEF, RATE).to_dict()
    config = model_config("TDNN", 4, {"ncoef": NCOEF, "latent_size": 16}) | {"frontend": front_end}
    net = models.build_model(config)
    paths["cp"] = str(root / "tdnn.pt")
    save_checkpoint(paths["cp"], {"model_config": net.config, "model_state": net.state_dict(), "args": {}})
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        t = np.arange(RATE) / RATE
        write_wav(root / f"{name}.wav", 3000 * np.sin(2 * np.pi * 300 * t) + rng.normal(0, 500, RATE))
        paths[name] = str(root / f"{name}.wav")
    paths["ci"] = write_image_checkpoint(root / "digits.pt", ImageInput("digits", 1, 8, 8, (0.3,), (0.4,)))
    wide = ImageInput("folder", 3, 6, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    paths["ci_wide"] = write_image_checkpoint(root / "wide.pt", wide)
    paths["kaldi"] = str(root / "kaldi")
    write_kaldi_dir(paths["kaldi"], ncoef=NCOEF)
    return paths


def snapshot(folder):
    """{relative path: bytes} of the files under `folder` (missing folder: {})."""
    found = {}
    for here, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(here, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def refused(main, argv, capsys, *words, folder=None):
    """Run `cli(main, argv)`: exit 2 and one stderr line holding `words`, no traceback, `folder` unchanged."""
    before = snapshot(folder) if folder else None
    with pytest.raises(SystemExit) as done:
        cli(main, argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.value.code == 2, (done.value.code, err, out[-500:])
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]
    if folder:
        assert snapshot(folder) == before, sorted(set(snapshot(folder)) ^ set(before))
    return lines[0]


def script_refuses(script, argv, cwd, *words):
    """Run the real script in a fresh interpreter: exit 2, one stderr line holding `words`, no traceback."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{os.path.basename(script)}: error: "), lines[0]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def verify_argv(d, *extra):
    return ["--cp-path", d["cp"], "--enroll", d["a"], "--test", d["b"], "--device", "cpu", *extra]


def calibration_file(path, provenance=None):
    """A calibration JSON made by calibration's own fit (as calibrate.py writes it), optionally with provenance."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2 == 0
    columns = {name: rng.normal(size=40) + labels for name in verify.COLUMNS}
    params = calibration.fit_calibration(columns, labels, 0.01, scorers=["e2e"])
    if provenance is not None:
        params["provenance"] = provenance
    write_json(str(path), params)
    return str(path)


# ----------------------------------------------------------------------------- item 9: --threshold


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_item9_non_finite_threshold_is_refused(d, capsys, value):
    refused(verify.main, verify_argv(d, f"--threshold={value}"), capsys, "--threshold must be a finite number")


def test_item9_non_finite_threshold_script(d, tmp_path):
    script_refuses("verify.py", verify_argv(d, "--threshold", "nan"), str(tmp_path), "--threshold", "finite")


def test_item9_finite_threshold_still_decides(d, capsys):
    assert verify.main(verify_argv(d, "--threshold=-1e9", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == -1e9 and out["results"][0]["accept"] is True


# ----------------------------------------------------------------------------- item 11: empty or non-finite embeddings


@pytest.fixture(scope="module")
def verifier(d):
    return verify.Verifier.load(d["cp"], "cpu")


@pytest.mark.parametrize(
    "enroll, test, message",
    [
        (torch.zeros(0, 512), torch.randn(1, 512), "no enrollment embeddings"),
        (torch.randn(2, 512), torch.zeros(0, 512), "no test embeddings"),
        (torch.full((1, 512), float("nan")), torch.randn(1, 512), "enrollment embeddings hold non-finite"),
        (torch.randn(1, 512), torch.full((1, 512), float("inf")), "test embeddings hold non-finite"),
        (torch.randn(1, 511), torch.randn(1, 512), "enrollment embeddings must be a (n, 512) tensor"),
        (torch.randn(1, 512), torch.randn(512), "test embeddings must be a (n, 512) tensor"),
    ],
    ids=["zero-enroll", "zero-test", "nan-enroll", "inf-test", "wrong-width", "one-dimensional"],
)
def test_item11_bad_embeddings_are_refused(verifier, enroll, test, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verifier.score_embeddings(enroll, test)


def test_item11_good_embeddings_score_finite(verifier):
    scores = verifier.score_embeddings(torch.randn(2, 512), torch.randn(3, 512))
    assert all(v.shape == (3,) and bool(torch.isfinite(v).all()) for v in scores.values())


def test_item11_a_file_whose_embedding_is_not_finite_is_named(d, tmp_path):
    """A model whose weights overflow gives NaN embeddings: the file is named, not NaN scores printed."""
    state = load_checkpoint(d["cp"])
    state["model_state"] = {
        k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model_state"].items()
    }
    save_checkpoint(str(tmp_path / "nan.pt"), state)
    broken = verify.Verifier.load(str(tmp_path / "nan.pt"), "cpu")
    with pytest.raises(UserError, match="non-finite .*embedding for .*a.wav"):
        broken.score(d["a"], d["b"])


# ----------------------------------------------------------------------------- item 12: repeated trials


def write_trials(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_item12_a_pair_labelled_both_ways_is_refused(tmp_path):
    path = write_trials(tmp_path / "trials", ["u1 u2 target", "u1 u3 nontarget", "", "u1 u2 nontarget"])
    with pytest.raises(UserError, match="lines 1 and 4: the trial u1 u2 is labelled both target and nontarget"):
        speech_data.read_trials(path)


def test_item12_a_repeated_trial_is_refused(tmp_path):
    path = write_trials(tmp_path / "trials", ["u1 u2 target", "u1 u3 nontarget", "u1 u3 nontgt"])
    with pytest.raises(UserError, match="lines 2 and 3: the trial u1 u3 is listed twice"):
        speech_data.read_trials(path)
    every_twice = write_trials(tmp_path / "twice", ["u1 u2 target", "u1 u3 nontarget"] * 2)
    with pytest.raises(UserError, match="lines 1 and 3: the trial u1 u2 is listed twice"):
        speech_data.read_trials(every_twice)


def test_item12_both_orders_of_a_pair_are_two_trials(tmp_path):
    """(a, b) and (b, a) are different trials (the enrollment side differs): both are kept."""
    path = write_trials(tmp_path / "trials", ["u1 u2 target", "u2 u1 target", "u1 u3 nontarget"])
    enroll, test, target = speech_data.read_trials(path)
    assert enroll == ["u1", "u2", "u1"] and test == ["u2", "u1", "u3"] and target.tolist() == [True, True, False]


def test_item12_a_long_trials_list_reads_fast(tmp_path):
    """200,000 distinct trials: the check is one dict look-up a line (HEAD reads this in about the same time)."""
    lines = [f"e{i // 400} t{i % 400}-{i // 400 % 7} {'target' if i % 9 == 0 else 'nontarget'}" for i in range(200_000)]
    path = write_trials(tmp_path / "trials", lines)
    start = time.perf_counter()
    enroll, _, target = speech_data.read_trials(path)
    assert len(enroll) == 200_000 and int(target.sum()) == len(range(0, 200_000, 9))
    assert time.perf_counter() - start < 10


def test_item12_eval_refuses_a_contradictory_trials_file(d, tmp_path):
    trials = open(os.path.join(d["kaldi"], "trials")).read().splitlines()
    enroll, test, label = trials[0].split()
    flipped = "nontarget" if label == "target" else "target"
    path = write_trials(tmp_path / "trials", [*trials, f"{enroll} {test} {flipped}"])
    out = str(tmp_path / "scores.out")
    argv = [
        "--cp-path",
        d["cp"],
        "--test-data",
        d["kaldi"],
        "--trials-path",
        path,
        "--out-path",
        out,
        "--device",
        "cpu",
    ]
    script_refuses("eval.py", argv, str(tmp_path), f"lines 1 and {len(trials) + 1}", "both target and nontarget")
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- item 13: --p-target


@pytest.mark.parametrize("value", ["5", "0.01", "nan"])
def test_item13_p_target_without_calibration_is_refused(d, capsys, value):
    refused(verify.main, verify_argv(d, "--p-target", value), capsys, "--p-target applies only with --calibration")


def test_item13_p_target_with_calibration_is_checked(d, tmp_path, capsys):
    cal = calibration_file(tmp_path / "cal.json")
    for value in ("5", "0", "nan", "inf"):
        argv = verify_argv(d, "--calibration", cal, "--p-target", value)
        refused(verify.main, argv, capsys, "--p-target must lie strictly between 0 and 1")
    assert verify.main(verify_argv(d, "--calibration", cal, "--p-target", "0.2", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["p_target"] == 0.2 and out["threshold"] == pytest.approx(np.log(4))
    assert verify.main(verify_argv(d, "--calibration", cal, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["p_target"] == verify.DEFAULT_P_TARGET


# ----------------------------------------------------------------------------- item 15: --chunk-seconds


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_item15_bad_chunk_seconds_is_one_line(d, capsys, value):
    refused(verify.main, verify_argv(d, f"--chunk-seconds={value}"), capsys, "chunk seconds must be >= 0")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_seconds": float("nan")},
        {"chunk_seconds": float("inf")},
        {"chunk_seconds": -0.5},
        {"chunk_seconds": "10"},
        {"min_frames": 0},
        {"min_frames": float("nan")},
        {"min_frames": 2.5},
    ],
    ids=["nan", "inf", "negative", "text", "zero-min-frames", "nan-min-frames", "fractional-min-frames"],
)
def test_item15_library_boundary_refuses_bad_chunking(d, verifier, kwargs):
    with pytest.raises(UserError, match="chunk seconds must|min frames must"):
        verify.Verifier.load(d["cp"], "cpu", **kwargs)
    state = load_checkpoint(d["cp"])
    with pytest.raises(UserError, match="chunk seconds must|min frames must"):
        verify.Verifier(verifier.model, state, d["cp"], verifier.device, **kwargs)


def test_item15_zero_still_means_whole_recordings(d):
    whole = verify.Verifier.load(d["cp"], "cpu", chunk_seconds=0, min_frames=np.int64(1))
    assert whole.score(d["a"], d["b"])["e2e"] == pytest.approx(
        verify.Verifier.load(d["cp"], "cpu", chunk_seconds=np.float32(100.0)).score(d["a"], d["b"])["e2e"]
    )


# ----------------------------------------------------------------------------- item 25: not a checkpoint


@pytest.fixture(scope="module")
def not_checkpoints(d):
    """Files that are not PyTorch checkpoints: text, an empty file, a PNG, a zip-less binary."""
    root = d["root"]
    files = {"readme": os.path.join(ROOT, "README.md"), "empty": os.path.join(root, "empty.pt")}
    open(files["empty"], "wb").close()
    files["png"] = os.path.join(root, "image.pt")
    Image.new("RGB", (4, 4)).save(files["png"], format="PNG")
    files["json"] = os.path.join(root, "config.pt")
    open(files["json"], "w").write('{"model_state": {}}\n')
    return files


@pytest.mark.parametrize("kind", ["readme", "empty", "png", "json"])
def test_item25_a_file_that_is_not_a_torch_file_is_named_so(not_checkpoints, kind):
    with pytest.raises(UserError, match="is not a PyTorch checkpoint file") as err:
        load_checkpoint(not_checkpoints[kind])
    assert "Python objects" not in str(err.value)


def test_item25_torch_files_keep_their_messages(tmp_path):
    """A real torch file with a pickled object still reads 'holds Python objects'; a legacy (non-zip) torch.save
    checkpoint still loads; a folder is named as one."""
    torch.save({"model_config": {}, "model_state": {}, "x": UserError("x")}, str(tmp_path / "objects.pt"))
    with pytest.raises(UserError, match="holds Python objects"):
        load_checkpoint(str(tmp_path / "objects.pt"))
    state = {"model_config": {"model": "TDNN"}, "model_state": {"w": torch.ones(2)}}
    torch.save(state, str(tmp_path / "legacy.pt"), _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(str(tmp_path / "legacy.pt"))["model_state"]["w"], torch.ones(2))
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("script", ["verify.py", "export.py", "train.py"])
def test_item25_scripts_say_not_a_checkpoint(d, tmp_path, script):
    readme = os.path.join(ROOT, "README.md")
    argv = {
        "verify.py": ["--cp-path", readme, "--enroll", d["a"], "--test", d["b"], "--device", "cpu"],
        "export.py": ["--cp-path", readme, "--out", str(tmp_path / "onnx")],
        "train.py": [
            "--pretrained-path",
            readme,
            "--checkpoint-path",
            str(tmp_path / "cp"),
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--verbose",
            "0",
        ],  # fmt: skip
    }[script]
    script_refuses(script, argv, str(tmp_path), f"{readme} is not a PyTorch checkpoint file")
    assert not os.path.exists(tmp_path / "onnx")


# ----------------------------------------------------------------------------- item 30: export's image size


def graph_input(folder):
    """The encoder graph's input dimensions (names for dynamic axes)."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
    graph = onnx.load(os.path.join(folder, "encoder.onnx")).graph
    return [dim.dim_param or dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim]


def test_item30_image_size_is_refused_for_a_speech_model(d, tmp_path, capsys):
    argv = ["--cp-path", d["cp"], "--out", str(tmp_path / "onnx"), "--image-size", "16"]
    refused(export.main, argv, capsys, "--image-size applies to image models", "speech", folder=str(tmp_path))
    assert not os.path.exists(tmp_path / "onnx")


def test_item30_an_image_model_exports_at_its_recorded_size(d, tmp_path):
    out = str(tmp_path / "onnx")
    assert export.main(["--cp-path", d["ci"], "--out", out]) == 0
    assert graph_input(out) == ["batch", 1, 8, 8]
    info = json.load(open(os.path.join(out, "export.json")))
    assert info["input"]["size"] == [8, 8] and "(batch, 1, 8, 8)" in info["graphs"]["encoder.onnx"]


def test_item30_a_non_square_record_exports_at_height_by_width(d, tmp_path):
    out = str(tmp_path / "onnx")
    assert export.main(["--cp-path", d["ci_wide"], "--out", out]) == 0
    assert graph_input(out) == ["batch", 3, 6, 10]
    info = json.load(open(os.path.join(out, "export.json")))
    assert info["input"]["size"] == [6, 10] and info["input"]["shape"] == ["batch", 3, 6, 10]
    assert "(batch, 3, 6, 10)" in info["graphs"]["encoder.onnx"]
    if info["parity_max_abs_diff"] is not None:
        assert info["parity_max_abs_diff"]["encoder_relative"] < 1e-5


def test_item30_image_size_still_overrides_the_record(d, tmp_path):
    out = str(tmp_path / "onnx")
    assert export.main(["--cp-path", d["ci"], "--out", out, "--image-size", "12"]) == 0
    assert graph_input(out) == ["batch", 1, 12, 12]


# ----------------------------------------------------------------------------- export's output folder and provenance


def test_export_marks_its_folder_and_records_provenance(d, tmp_path):
    out = str(tmp_path / "onnx")
    assert export.main(["--cp-path", d["ci"], "--out", out]) == 0
    marker = json.load(open(os.path.join(out, OUTPUT_MARKER)))
    assert marker["tool"] == "export"
    info = json.load(open(os.path.join(out, "export.json")))
    want = model_provenance(load_model(d["ci"]))
    assert info["provenance"] == json.loads(json.dumps(want)) and len(want["weights_sha256"]) == 16
    assert info["provenance"]["checkpoint"] == os.path.abspath(d["ci"])


def test_export_force_replaces_marked_and_older_exports_only(d, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--cp-path", d["ci"], "--out", str(out)]
    refused(export.main, argv, capsys, "not empty", "--force", folder=str(tmp_path))
    refused(export.main, [*argv, "--force"], capsys, "replaces only an earlier output of export", folder=str(tmp_path))
    (out / "notes.txt").unlink()
    (out / "export.json").write_text("{}")  # an export from before the marker
    (out / "encoder.onnx").write_text("old")
    refused(export.main, argv, capsys, "not empty", folder=str(tmp_path))
    assert export.main([*argv, "--force"]) == 0
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "distance.onnx", "encoder.onnx", "export.json"]
    assert export.main([*argv, "--force"]) == 0  # a marked export
    assert sorted(os.listdir(tmp_path)) == ["onnx"], "temporary or old folders were left behind"


def test_export_refuses_to_replace_a_folder_holding_its_checkpoint(d, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    cp = write_image_checkpoint(out / "cp.pt", ImageInput("digits", 1, 8, 8, (0.3,), (0.4,)))
    (out / "export.json").write_text("{}")
    argv = ["--cp-path", cp, "--out", str(out), "--force"]
    refused(export.main, argv, capsys, "holds --cp-path", folder=str(tmp_path))


def test_export_into_an_unwritable_folder_is_one_line(d, tmp_path, capsys):
    """As root a chmod'ed folder stays writable, so the parent is /proc/self, where no one can create a folder."""
    try:
        os.rmdir(tempfile.mkdtemp(dir="/proc/self"))
    except OSError:
        pass
    else:
        pytest.skip("/proc/self takes new folders here")
    refused(export.main, ["--cp-path", d["ci"], "--out", "/proc/self/onnx"], capsys, "cannot write in")


# ----------------------------------------------------------------------------- verify: the calibration's provenance


def test_verify_checks_the_calibrations_provenance(d, tmp_path, capsys):
    other = write_checkpoint(
        str(tmp_path / "other.pt"), "TDNN", encoder_args={"ncoef": NCOEF, "latent_size": 16}, seed=1
    )
    theirs = model_provenance(load_model(other))
    mine = model_provenance(load_model(d["cp"]))
    cal_other = calibration_file(tmp_path / "other.json", theirs)
    cal_mine = calibration_file(tmp_path / "mine.json", mine)
    if calibration.load_calibration(cal_other).get("provenance") is None:
        pytest.skip("calibration.load_calibration does not keep the 'provenance' key yet")
    line = refused(verify.main, verify_argv(d, "--calibration", cal_other), capsys, "--allow-other-model")
    assert f"calibration {cal_other} was made with" in line and theirs["weights_sha256"] in line
    assert verify.main(verify_argv(d, "--calibration", cal_other, "--allow-other-model")) == 0
    assert "used anyway" in capsys.readouterr().err
    assert verify.main(verify_argv(d, "--calibration", cal_mine)) == 0
    assert capsys.readouterr().err == ""


def test_verify_warns_for_a_calibration_without_provenance(d, tmp_path, capsys):
    cal = calibration_file(tmp_path / "cal.json")
    assert verify.main(verify_argv(d, "--calibration", cal)) == 0
    err = capsys.readouterr().err
    assert f"calibration {cal} does not record which model made it" in err
    assert "--allow-other-model" in verify.build_parser().format_help()
