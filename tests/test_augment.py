"""augment.py: SpecAugment stripes, speed perturbation, noise at an exact SNR, reverberation, and data_prep's copies.

Speech is Debian's Asterisk voice prompts (8 kHz); noise is a Debian sound under /usr/share/sounds when one
exists, else pink noise synthesised by sox (-D: no dither).
"""

import glob
import os
import shutil
import subprocess
import wave

import h5py
import numpy as np
import pytest
import torch

import data_prep
from e2e_verification import augment, frontend
from e2e_verification.augment import Augmenter, SpecAugment
from tools import asterisk_set
from utils import UserError

RATE = 8000
PROMPTS = [
    os.path.join(asterisk_set.SOUNDS, folder, f"{name}.wav")
    for folder in ("en_US_f_Allison", "fr_CA_f_June")
    for name in ("activated", "calling", "cancelled")
]
asterisk = pytest.mark.skipif(not os.path.isdir(asterisk_set.SOUNDS), reason="Asterisk prompt packages not installed")


def write_wav(path, samples, rate=RATE):
    """Write int16 samples with the stdlib."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


@pytest.fixture(scope="module")
def noise_wav(tmp_path_factory):
    """A real noise recording as 16-bit mono 8 kHz wav: a Debian sound if any, else sox's pink noise."""
    folder = tmp_path_factory.mktemp("noise")
    target = str(folder / "noise.wav")
    sox = shutil.which("sox")
    found = sorted(glob.glob("/usr/share/sounds/**/*.wav", recursive=True))
    if sox is None:
        pytest.skip("sox is not installed (scripts/install.sh --test installs it)")
    if found:
        cmd = [
            sox,
            "-D",
            found[0],
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-c",
            "1",
            "-r",
            str(RATE),
            target,
            "trim",
            "0",
            "0.7",
        ]
    else:
        cmd = [
            sox,
            "-D",
            "-n",
            "-r",
            str(RATE),
            "-b",
            "16",
            "-c",
            "1",
            target,
            "synth",
            "0.7",
            "pinknoise",
            "vol",
            "0.3",
        ]
    subprocess.run(cmd, check=True, capture_output=True)
    return target


def synthetic_rir(n_taps=1200, delay=40, seed=0):
    """A room impulse response: silence, a direct-path peak at `delay`, then an exponentially decaying tail."""
    rng = np.random.default_rng(seed)
    rir = np.zeros(n_taps)
    rir[delay] = 20000.0
    tail = np.arange(n_taps - delay - 1)
    rir[delay + 1 :] = 6000.0 * rng.standard_normal(len(tail)) * np.exp(-tail / 250.0)
    return rir.astype(np.int16)


# ----------------------------------------------------------------------------- SpecAugment


def zero_runs(flags):
    """Lengths of the runs of True in a 1-d boolean array."""
    padded = np.concatenate([[0], flags.astype(int), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


def test_specaugment_stripes_within_counts_and_widths(device):
    torch.manual_seed(0)
    x = torch.randn(64, 40, 120, device=device) + 5.0  # no exact zeros anywhere
    spec = SpecAugment(time_masks=2, time_width=10, freq_masks=2, freq_width=8).train()
    out = spec(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    for clean, masked in zip(x.cpu().numpy(), out.cpu().numpy(), strict=True):
        zero = masked == 0
        cols, rows = zero.all(axis=0), zero.all(axis=1)
        assert np.array_equal(zero, cols[None, :] | rows[:, None])  # zeros are whole stripes, nothing else
        assert np.array_equal(masked[~zero], clean[~zero])
        for flags, count, width in ((cols, 2, 10), (rows, 2, 8)):
            runs = zero_runs(flags)
            assert len(runs) <= count and runs.sum() <= count * width
    assert not torch.equal(out, x)
    torch.manual_seed(0)
    x_again = torch.randn(64, 40, 120, device=device) + 5.0
    assert torch.equal(spec(x_again), out)  # torch's seed decides the stripes
    assert spec.eval()(x) is x


def test_specaugment_width_is_uniform_zero_to_width(device):
    torch.manual_seed(1)
    spec = SpecAugment(time_masks=1, time_width=10, freq_masks=1, freq_width=8).train()
    out = spec(torch.ones(3000, 1, 30, 50, device=device)).cpu().numpy()[:, 0]
    time_w = (out == 0).all(axis=1).sum(axis=1)
    freq_w = (out == 0).all(axis=2).sum(axis=1)
    assert set(time_w.tolist()) == set(range(11)) and set(freq_w.tolist()) == set(range(9))
    assert abs(time_w.mean() - 5.0) < 0.3 and abs(freq_w.mean() - 4.0) < 0.3
    time_masked = (out == 0).all(axis=1)
    assert all(len(zero_runs(row)) <= 1 for row in time_masked)
    assert time_masked[:, 0].any() and time_masked[:, -1].any()  # stripes reach both ends


def test_specaugment_mean_fill(device):
    torch.manual_seed(2)
    x = torch.randn(8, 20, 60, device=device) * 3 + torch.arange(20.0, device=device)[:, None]
    out = SpecAugment(2, 10, 2, 5, fill="mean").train()(x)
    changed = out != x
    means = x.mean(dim=2, keepdim=True).expand_as(x)
    assert changed.any() and torch.equal(out[changed], means[changed])
    with pytest.raises(UserError, match="fill"):
        SpecAugment(fill="noise")


# ----------------------------------------------------------------------------- audio transforms


@pytest.mark.parametrize("factor", augment.SPEEDS)
def test_speed_changes_length_pitch_and_tempo(factor):
    tone = (8000 * np.sin(2 * np.pi * 500 * np.arange(4 * RATE) / RATE)).astype(np.float32)
    fast = augment.speed_perturb(tone, factor)
    assert abs(len(fast) - len(tone) / factor) <= 1
    spectrum = np.abs(np.fft.rfft(fast * np.hanning(len(fast)), n=16 * len(fast)))
    peak_hz = np.argmax(spectrum) * RATE / (16 * len(fast))
    assert abs(peak_hz - 500 * factor) < 0.5


@asterisk
@pytest.mark.parametrize("factor", augment.SPEEDS)
def test_speed_on_speech(factor):
    speech = frontend.load_wav(PROMPTS[0])
    fast = augment.speed_perturb(speech, factor)
    assert abs(len(fast) - len(speech) / factor) <= 1 and fast.dtype == np.float32
    feats = frontend.FrontEnd.mfcc(30, RATE).compute(fast, RATE)
    assert abs(feats.shape[1] - len(speech) / factor / 80) <= 1
    assert augment.speed_perturb(speech, 1.0) is speech


@asterisk
def test_noise_is_added_at_the_drawn_snr(noise_wav, tmp_path):
    os.symlink(noise_wav, tmp_path / "n.wav")
    aug = Augmenter(noise_dir=str(tmp_path), snr_range=(-5.0, 20.0), copies=6, seed=3)
    noise = frontend.load_wav(noise_wav)
    assert any(len(frontend.load_wav(p)) > len(noise) for p in PROMPTS)  # the noise is tiled for those
    for prompt in PROMPTS:
        speech = frontend.load_wav(prompt)
        for suffix, plan in aug.plans(os.path.basename(prompt)):
            assert suffix.startswith("-noise") and -5.0 <= plan["snr_db"] <= 20.0
            noisy = Augmenter.apply(speech, RATE, plan)
            assert noisy.shape == speech.shape
            added = noisy.astype(np.float64) - speech
            measured = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(added**2))
            assert abs(measured - plan["snr_db"]) < 0.01
            np.testing.assert_array_equal(Augmenter.apply(speech, RATE, plan), noisy)  # the plan fixes the draw
    segment = augment.noise_segment(np.arange(5.0), 12, np.random.default_rng(0))
    assert len(segment) == 12 and np.array_equal(np.diff(segment) % 5, np.ones(11))  # read circularly


def test_noise_segment_offsets_are_uniform():
    starts = [augment.noise_segment(np.arange(10.0), 4, np.random.default_rng(s))[0] for s in range(700)]
    assert set(starts) == set(range(7))
    tiled = [augment.noise_segment(np.arange(5.0), 12, np.random.default_rng(s))[0] for s in range(200)]
    assert set(tiled) == set(range(5))  # a tiled noise starts anywhere too
    with pytest.raises(UserError, match="silent"):
        augment.add_noise(np.ones(4, np.float32), np.zeros(4, np.float32), 10.0)


@asterisk
def test_reverb_equals_direct_convolution(tmp_path):
    rir = synthetic_rir()
    write_wav(tmp_path / "room.wav", rir)
    aug = Augmenter(rir_dir=str(tmp_path), copies=1, seed=0)
    [(suffix, plan)] = aug.plans("u")
    assert suffix == "-reverb1" and plan["file"] == str(tmp_path / "room.wav")
    speech = frontend.load_wav(PROMPTS[1])
    out = Augmenter.apply(speech, RATE, plan)
    h = rir.astype(np.float64) / np.sqrt(np.sum(rir.astype(np.float64) ** 2))
    direct = np.convolve(speech.astype(np.float64), h)[40 : 40 + len(speech)]
    assert out.shape == speech.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, direct, rtol=0, atol=1e-4 * np.abs(direct).max())
    assert np.corrcoef(out, speech)[0, 1] < 0.99  # the tail changed the signal


# ----------------------------------------------------------------------------- data_prep copies


def prompt_set(folder):
    """wav.scp + utt2spk for 3 prompts of 2 speakers; returns {utt: spk}."""
    folder.mkdir(parents=True, exist_ok=True)
    utt2spk = {f"{'allison' if 'Allison' in p else 'june'}-{os.path.basename(p)[:-4]}": p for p in PROMPTS}
    (folder / "wav.scp").write_text("".join(f"{utt} {path}\n" for utt, path in utt2spk.items()))
    (folder / "utt2spk").write_text("".join(f"{utt} {utt.split('-')[0]}\n" for utt in utt2spk))
    return {utt: utt.split("-")[0] for utt in utt2spk}


def read_groups(path):
    """{spk: {utt: (ncoef, frames)}} of an HDF5."""
    with h5py.File(path, "r") as h5:
        return {spk: {utt: h5[spk][utt][()] for utt in h5[spk]} for spk in h5}


@asterisk
def test_data_prep_speed_and_augmented_copies(tmp_path, noise_wav):
    utt2spk = prompt_set(tmp_path / "d")
    (tmp_path / "noise").mkdir()
    os.symlink(noise_wav, tmp_path / "noise" / "n.wav")
    (tmp_path / "rirs" / "sub").mkdir(parents=True)
    write_wav(tmp_path / "rirs" / "sub" / "room.wav", synthetic_rir())
    base = ["--wav-scp", str(tmp_path / "d" / "wav.scp"), "--out-path", str(tmp_path)]
    data_prep.main([*base, "--out-name", "plain.hdf"])
    aug = ["--speed-perturb", "--noise-dir", str(tmp_path / "noise"), "--rir-dir", str(tmp_path / "rirs"),
           "--augment-copies", "2", "--snr-range", "5", "10", "--seed", "7"]  # fmt: skip
    data_prep.main([*base, "--out-name", "aug.hdf", *aug])
    plain, groups = read_groups(tmp_path / "plain.hdf"), read_groups(tmp_path / "aug.hdf")
    assert set(groups) == {f"{p}{s}" for p in ("", "sp0.9-", "sp1.1-") for s in ("allison", "june")}
    kinds = []
    for utt, spk in utt2spk.items():
        original = plain[spk][utt]
        np.testing.assert_array_equal(groups[spk][utt], original)
        for prefix, factor in (("", 1.0), ("sp0.9-", 0.9), ("sp1.1-", 1.1)):
            own = groups[prefix + spk]
            version = own[prefix + utt]
            assert abs(version.shape[1] - original.shape[1] / factor) <= 1.5
            copies = sorted(name for name in own if name.startswith(prefix + utt + "-"))
            assert sorted(c[-1] for c in copies) == ["1", "2"]
            for name in copies:
                kinds.append(name.rsplit("-", 1)[1][:-1])
                assert own[name].shape == version.shape and not np.array_equal(own[name], version)
    assert set(kinds) == {"noise", "reverb"}
    data_prep.main([*base, "--out-name", "again.hdf", *aug])
    again = read_groups(tmp_path / "again.hdf")
    assert all(np.array_equal(again[s][u], groups[s][u]) for s in groups for u in groups[s])
    data_prep.main([*base, "--out-name", "seed8.hdf", *aug[:-1], "8"])
    other = read_groups(tmp_path / "seed8.hdf")
    assert any(not np.array_equal(other[s][u], groups[s][u]) for s in groups for u in groups[s] if u in other[s])


@asterisk
def test_min_recordings_counts_originals(tmp_path):
    prompt_set(tmp_path / "d")
    base = ["--wav-scp", str(tmp_path / "d" / "wav.scp"), "--out-path", str(tmp_path), "--speed-perturb"]
    with pytest.raises(UserError, match="no speaker has at least 4 recordings"):
        data_prep.main([*base, "--min-recordings", "4"])
    data_prep.main([*base, "--min-recordings", "3"])
    assert len(read_groups(tmp_path / "train.hdf")) == 6


def test_augmentation_flag_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write_wav(tmp_path / "a.wav", np.zeros(800))
    (tmp_path / "wav.scp").write_text(f"u1 {tmp_path / 'a.wav'}\n")
    (tmp_path / "utt2spk").write_text("u1 s1\n")
    wav = ["--wav-scp", str(tmp_path / "wav.scp"), "--out-path", str(tmp_path)]
    cases = [
        ([*wav, "--snr-range", "0", "10"], "--snr-range needs --noise-dir"),
        ([*wav, "--augment-copies", "2"], "--augment-copies needs --noise-dir or --rir-dir"),
        ([*wav, "--noise-dir", str(tmp_path / "empty")], "no .wav files found under --noise-dir"),
        ([*wav, "--rir-dir", str(tmp_path / "nowhere")], "--rir-dir folder not found"),
        ([*wav, "--noise-dir", str(tmp_path), "--snr-range", "10", "0"], "LOW <= HIGH"),
        ([*wav, "--noise-dir", str(tmp_path), "--augment-copies", "0"], "--augment-copies must be positive"),
        (["--path-to-data", str(tmp_path), "--out-path", str(tmp_path), "--speed-perturb"], "works on audio"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            data_prep.main(argv)
    assert not os.path.exists(tmp_path / "train.hdf")
