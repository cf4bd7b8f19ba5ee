"""embed.py from wav files (--wav-scp, --wav-dir) through the checkpoint's front end; the front-end check of
embed.py and eval.py; no output folder left behind on failure."""

import os
import wave

import h5py
import numpy as np
import pytest
import torch
from tiny_data import model_config, write_speaker_hdf5

import data_prep
import embed
import eval as eval_script
import models
from e2e_verification.checkpoints import save_checkpoint
from e2e_verification.frontend import read_frontend
from utils import cli

RATE = 8000


def write_wav(path, samples, rate=RATE, channels=1):
    """int16 samples (samples,) or (samples, channels) as a PCM wav."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def write_speech_checkpoint(path, front_end, ncoef=30, seed=0):
    """An untrained TDNN checkpoint whose model_config records `front_end` (a dict, or None: Kaldi features)."""
    torch.manual_seed(seed)
    config = model_config("TDNN", 3, {"ncoef": ncoef, "latent_size": 16}) | {"frontend": front_end}
    net = models.build_model(config)
    save_checkpoint(str(path), {"model_config": net.config, "model_state": net.state_dict(), "args": {}})
    return str(path)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """3 speakers x 3 generated 8 kHz recordings (tones + noise, 0.6 to 1.4 s) as a wav folder and a wav.scp,
    their features from data_prep.py (HDF5 + Kaldi export; also 20 cepstra and CMN variants), checkpoints."""
    root = tmp_path_factory.mktemp("embed_wav")
    rng = np.random.default_rng(0)
    scp, utt2spk = [], []
    for s, spk in enumerate(("anna", "bert", "carl")):
        os.makedirs(root / "wavs" / spk)
        for i in range(3):
            n = int(RATE * (0.6 + 0.4 * i))
            t = np.arange(n) / RATE
            tone = 3000 * np.sin(2 * np.pi * (200 + 150 * s) * t) + rng.normal(0, 500, n)
            path = root / "wavs" / spk / f"u{i}.wav"
            write_wav(path, np.clip(tone, -32768, 32767))
            scp.append(f"{spk}-u{i} {path}\n")
            utt2spk.append(f"{spk}-u{i} {spk}\n")
    os.makedirs(root / "data")
    (root / "data" / "wav.scp").write_text("".join(scp))
    (root / "data" / "utt2spk").write_text("".join(utt2spk))
    spk2utt = {}
    for line in utt2spk:
        utt, spk = line.split()
        spk2utt.setdefault(spk, []).append(utt)
    (root / "data" / "spk2utt").write_text("".join(f"{s} {' '.join(u)}\n" for s, u in spk2utt.items()))
    for name, flags in (("feats", []), ("feats20", ["--ncoef", "20"]), ("cmn", ["--cmn"])):
        argv = ["--wav-scp", str(root / "data" / "wav.scp"), "--out-path", str(root), "--out-name", f"{name}.hdf"]
        assert data_prep.main([*argv, "--write-kaldi-feats", str(root / f"{name}_kaldi"), *flags]) == 0
    paths = {"root": root, "scp": str(root / "data" / "wav.scp"), "wav_dir": str(root / "wavs")}
    paths["front_end"] = read_frontend(str(root / "feats.hdf")).to_dict()
    paths["cp"] = write_speech_checkpoint(root / "tdnn.pt", paths["front_end"])
    paths["cp_kaldi"] = write_speech_checkpoint(root / "kaldi.pt", None)
    return paths


def run(main, argv, capsys):
    """Run a script's main through utils.cli in-process: -> (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        cli(main, argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def read_h5(path):
    with h5py.File(path, "r") as h5:
        return {utt: h5[utt][()] for utt in h5}


def test_embeddings_from_wav_equal_those_from_data_prep_features(d, tmp_path, capsys):
    """embed.py --wav-scp / --wav-dir == data_prep.py (same wavs, same settings) + embed.py --data, to 1e-5."""
    cp = d["cp"]
    assert (
        embed.main(["--data", str(d["root"] / "feats.hdf"), "--cp-path", cp, "--out-path", str(tmp_path / "h5")]) == 0
    )
    kaldi = str(d["root"] / "feats_kaldi" / "feats.scp")
    assert embed.main(["--data", kaldi, "--cp-path", cp, "--out-path", str(tmp_path / "ark")]) == 0
    assert embed.main(["--wav-scp", d["scp"], "--cp-path", cp, "--out-path", str(tmp_path / "scp")]) == 0
    assert embed.main(["--wav-dir", d["wav_dir"], "--cp-path", cp, "--out-path", str(tmp_path / "dir")]) == 0
    want = read_h5(tmp_path / "h5" / "embeddings.h5")
    assert len(want) == 9
    for name in ("ark", "scp", "dir"):
        got = read_h5(tmp_path / name / "embeddings.h5")
        assert sorted(got) == sorted(want), name
        for utt in want:
            np.testing.assert_allclose(got[utt], want[utt], atol=1e-5, rtol=0, err_msg=f"{name} {utt}")
    with h5py.File(tmp_path / "dir" / "embeddings.h5", "r") as h5:
        assert h5["bert-u1"].attrs["spk"] == "bert"
    with h5py.File(tmp_path / "scp" / "embeddings.h5", "r") as h5:  # speakers from the utt2spk beside wav.scp
        assert h5["carl-u2"].attrs["spk"] == "carl"


@pytest.mark.parametrize(
    ("data", "difference"),
    [
        ("feats20.hdf", "num_ceps 30 vs 20"),
        ("feats20_kaldi/feats.scp", "num_ceps 30 vs 20"),
        ("cmn.hdf", "cmn False vs True"),
    ],
)
def test_features_of_another_front_end_are_refused(d, tmp_path, capsys, data, difference):
    """A real mismatch is refused by embed.py and eval.py with one line naming the difference; nothing written."""
    data = str(d["root"] / data)
    out = tmp_path / "out"
    code, _, err = run(embed.main, ["--data", data, "--cp-path", d["cp"], "--out-path", str(out)], capsys)
    assert code == 2 and difference in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    trials = tmp_path / "trials"
    trials.write_text("anna-u0 anna-u1 target\nanna-u0 bert-u0 nontarget\n")
    argv = ["--test-data", data, "--trials-path", str(trials), "--cp-path", d["cp"], "--out-path", str(tmp_path / "s")]
    code, _, err = run(eval_script.main, argv, capsys)
    assert code == 2 and difference in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_equal_or_unknown_front_ends_are_accepted(d, tmp_path):
    """Same front end; a checkpoint without one (Kaldi-trained / old) on recorded features; features without a
    record (an HDF5 from Kaldi features) for a checkpoint with one."""
    trials = tmp_path / "trials"
    trials.write_text("anna-u0 anna-u1 target\nanna-u0 bert-u0 nontarget\n")
    for cp, data in (
        (d["cp"], d["root"] / "feats_kaldi" / "feats.scp"),
        (d["cp_kaldi"], d["root"] / "cmn.hdf"),
    ):
        argv = ["--test-data", str(data), "--trials-path", str(trials), "--cp-path", cp, "--out-path", str(tmp_path)]
        assert eval_script.main(argv) == 0
    unrecorded = write_speaker_hdf5(str(tmp_path / "kaldi.h5"), {"s0": 2, "s1": 2}, ncoef=30)
    assert read_frontend(unrecorded) is None
    assert embed.main(["--data", unrecorded, "--cp-path", d["cp"], "--out-path", str(tmp_path / "e")]) == 0


def test_bad_wav_input_is_one_line_and_leaves_no_folder(d, tmp_path, capsys):
    """A stereo file, an empty one, a PNG named .wav in the wav.scp; a Kaldi-trained checkpoint; both sources."""
    bad = {
        "stereo": lambda p: write_wav(p, np.zeros((800, 2)), channels=2),
        "empty": lambda p: write_wav(p, np.zeros(0)),
        "image": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
    }
    for name, make in bad.items():
        wav = tmp_path / f"{name}.wav"
        make(wav)
        scp = tmp_path / f"{name}.scp"
        scp.write_text(open(d["scp"]).read() + f"zed-u0 {wav}\n")
        out = tmp_path / f"out_{name}"
        code, _, err = run(embed.main, ["--wav-scp", str(scp), "--cp-path", d["cp"], "--out-path", str(out)], capsys)
        assert code == 2 and str(wav) in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists(), name
    existing = tmp_path / "existing"
    existing.mkdir()
    argv = ["--wav-scp", str(tmp_path / "stereo.scp"), "--cp-path", d["cp"], "--out-path", str(existing)]
    assert run(embed.main, argv, capsys)[0] == 2
    assert existing.is_dir() and not os.listdir(existing)  # a folder that was there stays, and stays empty
    out = tmp_path / "kaldi_out"
    code, _, err = run(embed.main, ["--wav-scp", d["scp"], "--cp-path", d["cp_kaldi"], "--out-path", str(out)], capsys)
    assert code == 2 and "Kaldi" in err and "cannot take wav files" in err and not out.exists(), err
    argv = ["--wav-scp", d["scp"], "--data", str(d["root"] / "feats.hdf"), "--cp-path", d["cp"], "--out-path", str(out)]
    code, _, err = run(embed.main, argv, capsys)
    assert code == 2 and "not allowed with argument" in err and not out.exists(), err
