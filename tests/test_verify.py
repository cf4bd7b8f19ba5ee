"""verify.py and its Python API: real Asterisk recordings through a model trained as the README shows; image
files normalised as the training images were; bad input as one line."""

import json
import math
import os
import shutil
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_embed_wav import run, write_wav
from tiny_data import make_image_tree, write_checkpoint

import data_load
import verify
from e2e_verification import frontend, image_input
from e2e_verification.calibration import fit_calibration, read_score_file
from e2e_verification.checkpoints import load_checkpoint, save_checkpoint
from e2e_verification.frontend import read_wav
from tools import asterisk_set
from utils import write_json

needs_asterisk = pytest.mark.skipif(
    not os.path.isdir(asterisk_set.SOUNDS) or shutil.which("sox") is None,
    reason="Asterisk prompt packages or sox not installed",
)


@pytest.fixture(scope="module")
def ast(tmp_path_factory):
    """The README's Asterisk sequence at small settings (12 prompts per speaker, one epoch): checkpoint, wav
    paths, the test trials' scores from eval.py."""
    from test_asterisk import run_sequence

    out = tmp_path_factory.mktemp("verify_ast") / "ast"
    flags = ["--epochs", "1", "--n-frames", "50", "--batch-size", "3", "--workers", "0", "--lr", "0.5",
             "--warmup", "10", "--latent-size", "64", "--hidden-size", "32", "--verbose", "0"]  # fmt: skip
    _, cp = run_sequence(out, 12, flags, valid_fraction=0.2)
    wavs = dict(line.split() for line in open(out / "test" / "wav.scp"))
    columns, labels, enroll, test = read_score_file(str(out / "scores.out"))
    trials = {
        (a, b): {k: v[i] for k, v in columns.items()} | {"target": labels[i]}
        for i, (a, b) in enumerate(zip(enroll, test))
    }
    return {"out": out, "cp": cp, "wavs": wavs, "trials": trials, "columns": columns, "labels": labels}


def short(ast, utt):
    """Whether a test recording is shorter than 10 s (one chunk, as eval.py embeds it)."""
    samples, rate = read_wav(ast["wavs"][utt])
    return len(samples) < 10 * rate


def pick(ast, target):
    """A (enroll, test) trial of eval.py's test trials of that kind, both recordings short."""
    return next(k for k, v in ast["trials"].items() if v["target"] == target and short(ast, k[0]) and short(ast, k[1]))


@needs_asterisk
def test_verify_two_real_recordings_of_one_speaker_and_of_two(ast, capsys):
    """The README's verify.py line on real prompts: a decision and four scores per test file, equal to eval.py's."""
    (a, b), (c, e) = pick(ast, True), pick(ast, False)
    assert verify.main(["--cp-path", ast["cp"], "--enroll", ast["wavs"][a], "--test", ast["wavs"][b]]) == 0
    assert verify.main(["--cp-path", ast["cp"], "--enroll", ast["wavs"][c], "--test", ast["wavs"][e]]) == 0
    printed = capsys.readouterr().out
    print(printed)
    lines = [line for line in printed.splitlines() if line.startswith(("ACCEPT", "reject"))]
    # the checkpoint was trained with validation, so it carries a calibration, which decides by default
    rule = "decision: accept when cal_e2e_logit+cos >= 4.595, the Bayes threshold at p_target 0.01 (the checkpoint's"
    assert len(lines) == 2 and rule in printed
    for line, trial in zip(lines, ((a, b), (c, e))):
        words = line.split()
        values = dict(zip(words[2::2], map(float, words[3::2])))
        want = ast["trials"][trial]
        for name in ("e2e", "e2e_logit", "cos", "fus"):
            assert values[name] == pytest.approx(want[name], abs=2e-4), (name, trial)
        assert (words[0] == "ACCEPT") == (values["cal_e2e_logit+cos"] >= 4.595)
    argv = ["--cp-path", ast["cp"], "--enroll", ast["wavs"][a], "--test", ast["wavs"][b], "--threshold", "0.5"]
    capsys.readouterr()
    assert verify.main(argv) == 0  # a threshold: the raw e2e score decides, as before the checkpoint calibration
    printed = capsys.readouterr().out
    assert "decision: accept when e2e >= 0.5" in printed and "cal_" not in printed


@needs_asterisk
def test_python_api_scores_as_eval_and_averages_enrollment(ast):
    verifier = verify.Verifier.load(ast["cp"], "cpu", chunk_seconds=0)
    (a, b), (c, e) = pick(ast, True), pick(ast, False)
    for trial in ((a, b), (c, e)):
        scores = verifier.score(ast["wavs"][trial[0]], ast["wavs"][trial[1]])
        for name in ("e2e", "e2e_logit", "cos", "fus"):
            assert scores[name] == pytest.approx(ast["trials"][trial][name], abs=2e-4), name
    enroll = [ast["wavs"][a], ast["wavs"][b]]
    both = verifier.score(enroll, ast["wavs"][e])
    alone = [verifier.score(path, ast["wavs"][e]) for path in enroll]
    assert both["e2e"] == pytest.approx(np.mean([s["e2e"] for s in alone]), abs=1e-6)
    assert both["e2e_logit"] == pytest.approx(np.mean([s["e2e_logit"] for s in alone]), abs=1e-6)
    emb = verifier.embed_files(enroll)
    centre = F.normalize(emb, dim=1).mean(0)
    assert both["cos"] == pytest.approx(
        float(F.cosine_similarity(centre, verifier.embed_file(ast["wavs"][e]), 0)), 1e-5
    )


@needs_asterisk
def test_calibrated_decisions_and_json(ast, tmp_path, capsys):
    """With a calibration fitted on eval.py's scores: LLR = a * score + b, accepted at log((1-p)/p)."""
    params = fit_calibration(ast["columns"], ast["labels"], 0.01, fusions=[["e2e_logit", "cos"]], scorers=["cos"])
    write_json(str(tmp_path / "cal.json"), params)
    (a, b), (_, e) = pick(ast, True), pick(ast, False)
    argv = ["--cp-path", ast["cp"], "--enroll", ast["wavs"][a], "--test", ast["wavs"][b], ast["wavs"][e], "--json"]
    assert verify.main([*argv, "--calibration", str(tmp_path / "cal.json"), "--p-target", "0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["column"] == "cal_e2e_logit+cos" and out["threshold"] == pytest.approx(math.log(19))
    fusion = params["fusions"]["e2e_logit+cos"]
    for result in out["results"]:
        s = result["scores"]
        llr = fusion["bias"] + sum(w * s[k] for k, w in fusion["weights"].items())
        assert result["llr"]["cal_e2e_logit+cos"] == pytest.approx(llr, abs=1e-6)
        cal = params["calibrations"]["cos"]
        assert result["llr"]["cal_cos"] == pytest.approx(cal["a"] * s["cos"] + cal["b"], abs=1e-6)
        assert result["accept"] == (llr >= math.log(19))
    assert verify.main([*argv, "--calibration", str(tmp_path / "cal.json"), "--scorer", "cos"]) == 0
    assert json.loads(capsys.readouterr().out)["column"] == "cal_cos"
    assert verify.main([*argv, "--scorer", "cos", "--threshold", "0.99"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["accept"] for r in out["results"]] == [r["scores"]["cos"] >= 0.99 for r in out["results"]]


@needs_asterisk
def test_long_recordings_are_embedded_in_chunks(ast, tmp_path):
    """A 3-prompt concatenation: its embedding is the mean of its ~1 s chunks' (chunk-seconds 1)."""
    utts = [u for u in ast["wavs"] if u.startswith(next(iter(ast["wavs"])).split("-")[0])][:3]
    samples = [read_wav(ast["wavs"][u]) for u in utts]
    long = tmp_path / "long.wav"
    write_wav(long, np.concatenate([s for s, _ in samples]), rate=samples[0][1])
    verifier = verify.Verifier.load(ast["cp"], "cpu", chunk_seconds=1, min_frames=1)  # no tiling of ~1 s chunks
    feats = frontend.wav_features(frontend.front_end_of(verifier.model.config, ast["cp"]), long)
    parts = frontend.chunks(feats, 100)
    assert len(parts) == round(feats.shape[1] / 100) > 2
    assert sum(p.shape[1] for p in parts) == feats.shape[1] and all(abs(p.shape[1] - 100) <= 50 for p in parts)
    with torch.no_grad():
        each = [verifier.model.embed(torch.from_numpy(np.ascontiguousarray(p))[None])[0] for p in parts]
    torch.testing.assert_close(verifier.embed_file(long), torch.stack(each).mean(0), atol=1e-5, rtol=0)
    whole = verify.Verifier.load(ast["cp"], "cpu", chunk_seconds=0, min_frames=1).embed_file(long)
    assert not torch.allclose(whole, torch.stack(each).mean(0), atol=1e-3)


@needs_asterisk
def test_bad_audio_input_is_one_line(ast, tmp_path, capsys):
    a = ast["wavs"][next(iter(ast["wavs"]))]
    write_wav(tmp_path / "stereo.wav", np.zeros((800, 2)), channels=2)
    write_wav(tmp_path / "empty.wav", np.zeros(0))
    write_wav(tmp_path / "blip.wav", np.zeros(3))
    write_wav(tmp_path / "zero_rate.wav", np.zeros(800))
    raw = bytearray((tmp_path / "zero_rate.wav").read_bytes())
    raw[24:28] = bytes(4)  # a header claiming 0 Hz: nothing to resample from
    (tmp_path / "zero_rate.wav").write_bytes(raw)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    cases = {
        "stereo.wav": "not mono 16-bit",
        "empty.wav": "holds no audio samples",
        "blip.wav": "too short",
        "zero_rate.wav": "cannot be resampled",
        "photo.png": "is not a 16-bit PCM wav file",
        "missing.wav": "file not found",
    }
    for name, message in cases.items():
        argv = ["--cp-path", ast["cp"], "--enroll", a, "--test", str(tmp_path / name)]
        code, out, err = run(verify.main, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out, (name, err)
    for flags, message in (
        (["--calibration", str(tmp_path / "none.json")], "cannot read calibration file"),
        (["--scorer", "cos"], "give --threshold"),
        (["--calibration", str(tmp_path / "none.json"), "--threshold", "0"], "cannot read calibration"),
        (["--chunk-seconds", "-1"], "chunk seconds must be >= 0"),
    ):
        code, out, err = run(verify.main, ["--cp-path", ast["cp"], "--enroll", a, "--test", a, *flags], capsys)
        assert code == 2 and message in err and not out, (flags, err)
    state = load_checkpoint(ast["cp"])
    state["model_config"]["frontend"] = None  # as if trained on Kaldi features
    save_checkpoint(str(tmp_path / "kaldi.pt"), state)
    code, _, err = run(verify.main, ["--cp-path", str(tmp_path / "kaldi.pt"), "--enroll", a, "--test", a], capsys)
    assert code == 2 and "cannot take wav files" in err


# ----------------------------------------------------------------------------- images


def test_image_files_are_normalised_as_in_training(tmp_path):
    """A PNG of a training image gives exactly data_load's tensor: image folders, and Fashion-MNIST's IDX."""
    tree = make_image_tree(str(tmp_path / "tree"), n_classes=2, per_class=3, size=12)
    folder = data_load.load_images(tree, "test")
    found = image_input.ImageInput.from_dict(image_input.record(folder))
    assert (found.source, found.channels, found.height, found.width) == ("folder", 3, 12, 12)
    for i, (path, _) in enumerate(folder.folder.samples):
        assert torch.equal(found.load(path), folder[i][0])
    if not os.path.isdir(data_load.FASHION_DIR):
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) not installed")
    idx = data_load.select_classes(data_load.load_images(data_load.FASHION_DIR, "test"), "5-9", items_per_class=2)
    found = image_input.ImageInput.from_dict(image_input.record(idx))
    assert (found.source, found.channels, found.height, found.width) == ("idx", 1, 28, 28)
    raw = data_load._read_idx(data_load._find(data_load.FASHION_DIR, "t10k-images-idx3-ubyte"))
    for i, index in enumerate(idx.indices):
        Image.fromarray(raw[index]).save(tmp_path / f"{i}.png")
        assert torch.equal(found.load(tmp_path / f"{i}.png"), idx[i][0])


@pytest.fixture
def image_cp(tmp_path):
    """An untrained image checkpoint that records its input (3x12x12 folder images), and its tree."""
    tree = make_image_tree(str(tmp_path / "tree"), n_classes=2, per_class=3, size=12)
    path = write_checkpoint(str(tmp_path / "img.pt"))
    state = load_checkpoint(path)
    state["model_config"]["image_input"] = image_input.record(data_load.load_images(tree, "test"))
    save_checkpoint(path, state)
    return path, tree


def test_verify_image_files(image_cp, tmp_path, capsys):
    cp, tree = image_cp
    first, second = (os.path.join(tree, "class0", f"{i}.png") for i in range(2))
    Image.open(first).resize((30, 20)).convert("L").save(tmp_path / "other_size_gray.jpg")
    argv = ["--cp-path", cp, "--enroll", first, "--test", first, second, str(tmp_path / "other_size_gray.jpg")]
    assert verify.main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["scores"]["cos"] == pytest.approx(1.0, abs=1e-5) and len(results) == 3
    write_wav(tmp_path / "speech.wav", np.zeros(800))
    code, _, err = run(
        verify.main, ["--cp-path", cp, "--enroll", first, "--test", str(tmp_path / "speech.wav")], capsys
    )
    assert code == 2 and "not an image Pillow can decode" in err and len(err.strip().splitlines()) == 1


def test_old_image_checkpoints(tmp_path, capsys):
    """Before the record: the digits demo's input is derived from its arguments; otherwise one clear line."""
    path = write_checkpoint(str(tmp_path / "old.pt"), encoder_args={"in_channels": 1, "stem": "cifar"})
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    code, _, err = run(
        verify.main, ["--cp-path", path, "--enroll", str(tmp_path / "x.png"), "--test", str(tmp_path / "x.png")], capsys
    )
    assert code == 2 and "does not record how its training images were normalised" in err
    state = load_checkpoint(path)
    state["args"] = {"data_path": None}  # the digits demo
    save_checkpoint(path, state)
    verify.Verifier.load(path, "cpu")  # loads now
    found = image_input.from_checkpoint(load_checkpoint(path), path)
    assert (found.source, found.channels, found.height, found.width) == ("digits", 1, 8, 8)


def test_chunks_split_evenly():
    feats = np.zeros((3, 1049), dtype=np.float32)
    assert [p.shape[1] for p in frontend.chunks(feats, 100)] == [105] * 9 + [104]
    assert len(frontend.chunks(feats, 0)) == 1 and len(frontend.chunks(feats[:, :140], 100)) == 1
    assert [p.shape[1] for p in frontend.chunks(feats[:, :160], 100)] == [80, 80]


def test_wave_module_writes_what_read_wav_reads(tmp_path):
    write_wav(tmp_path / "a.wav", np.arange(10))
    with wave.open(str(tmp_path / "a.wav")) as handle:
        assert handle.getframerate() == 8000
    assert read_wav(tmp_path / "a.wav")[0].tolist() == list(range(10))
