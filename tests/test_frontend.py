"""frontend.py: the FrontEnd record, MFCC / fbank against kaldi-native-fbank, wav loading, where it is recorded."""

import json
import os
import wave

import h5py
import kaldi_native_fbank as knf
import kaldiio
import numpy as np
import pytest
from scipy.signal import resample_poly

import data_prep
from e2e_verification import frontend
from e2e_verification.frontend import FrontEnd
from tools import asterisk_set
from utils import UserError

asterisk = pytest.mark.skipif(not os.path.isdir(asterisk_set.SOUNDS), reason="Asterisk prompt packages not installed")
PROMPT = os.path.join(asterisk_set.SOUNDS, "en_US_f_Allison", "activated.wav")


def write_wav(path, samples, rate, channels=1):
    """Write int16 samples (repeated over `channels`) with the stdlib."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.repeat(np.asarray(samples, dtype="<i2"), channels).tobytes())


def sine(freq, rate, seconds, amplitude=8000.0):
    """A sine on the int16 scale, float32 (samples,)."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def knf_fbank(samples, rate, bins):
    """Kaldi log mel filterbanks computed with kaldi-native-fbank directly: (frames, bins)."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = False
    opts.mel_opts.num_bins = bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = -400.0
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(rate, samples.tolist())
    fbank.input_finished()
    return np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def test_record_round_trip_and_differences():
    mfcc = FrontEnd.mfcc(30, 8000)
    assert FrontEnd.from_dict(json.loads(mfcc.to_json())) == mfcc and mfcc.n_coef == 30
    fbank = FrontEnd.fbank(80, 16000, cmn=True)
    assert FrontEnd.from_dict(fbank.to_dict()) == fbank and fbank.n_coef == 80 and fbank.num_ceps is None
    assert mfcc.describe_difference(FrontEnd.mfcc(30, 8000)) == ""
    line = mfcc.describe_difference(fbank)
    assert "\n" not in line
    for part in ("kind mfcc vs fbank", "sample_rate 8000 vs 16000", "num_mel_bins 30 vs 80", "cmn False vs True"):
        assert part in line
    assert "frame_shift_ms" not in line
    assert "unknown" in mfcc.describe_difference(None)
    assert FrontEnd.from_dict({"kind": "fbank", "num_mel_bins": 40}).sample_rate == 16000
    with pytest.raises(UserError, match="unknown front-end setting.*warp"):
        FrontEnd.from_dict({**mfcc.to_dict(), "warp": 1.0})
    with pytest.raises(UserError, match="bad front-end setting"):
        FrontEnd.from_dict({**mfcc.to_dict(), "sample_rate": "16k"})
    with pytest.raises(UserError, match="kind"):
        FrontEnd.from_dict({**mfcc.to_dict(), "kind": "plp"})
    with pytest.raises(UserError, match="num_ceps <= num_mel_bins"):
        FrontEnd.mfcc(30, 8000, num_mel_bins=20)
    with pytest.raises(UserError, match="refuses the front end fbank 200 mel bins @ 8000 Hz.*too large"):
        FrontEnd.fbank(200, 8000).compute(np.zeros(800, np.float32), 8000)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_fbank_equals_kaldi_native_fbank(rate):
    rng = np.random.default_rng(rate)
    samples = (sine(300, rate, 1.3) + 500 * rng.standard_normal(int(rate * 1.3))).astype(np.float32)
    feats = FrontEnd.fbank(80, rate).compute(samples, rate)
    assert feats.shape == (80, round(len(samples) / (rate // 100))) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, knf_fbank(samples, rate, 80).T.astype(np.float32))
    mfcc = FrontEnd.mfcc(30, rate).compute(samples.astype(np.int16), rate)
    assert mfcc.shape == (30, feats.shape[1]) and not np.allclose(mfcc[:, :5], feats[:30, :5])


@asterisk
def test_compute_reproduces_data_prep(tmp_path):
    """What the lead calls at verification time gives the HDF5's numbers for the same file, CMN included."""
    (tmp_path / "wav.scp").write_text(f"u1 {PROMPT}\n")
    (tmp_path / "utt2spk").write_text("u1 allison\n")
    for feature, cmn in (("fbank", ["--cmn"]), ("mfcc", [])):
        argv = ["--wav-scp", str(tmp_path / "wav.scp"), "--out-path", str(tmp_path), "--feature", feature, *cmn]
        data_prep.main([*argv, "--write-kaldi-feats", str(tmp_path / "k")])
        recorded = frontend.read_frontend(str(tmp_path / "train.hdf"))
        assert recorded.kind == feature and recorded.sample_rate == 8000 and recorded.cmn == bool(cmn)
        assert frontend.frontend_for_features(str(tmp_path / "k" / "feats.scp")) == recorded
        assert frontend.frontend_for_features(str(tmp_path / "k")) == recorded
        with h5py.File(tmp_path / "train.hdf", "r") as h5:
            stored = h5["allison"]["u1"][()]
        again = recorded.compute(frontend.load_wav(PROMPT, recorded.sample_rate), 8000)
        np.testing.assert_array_equal(again, stored)
        assert stored.shape[0] == (80 if feature == "fbank" else 30)


def test_kaldi_features_record_no_front_end(tmp_path):
    feats = {f"s{i}-u": np.random.default_rng(i).standard_normal((20, 30)).astype(np.float32) for i in range(2)}
    kaldiio.save_ark(str(tmp_path / "f.ark"), feats, scp=str(tmp_path / "feats.scp"))
    (tmp_path / "utt2spk").write_text("".join(f"{utt} {utt[:2]}\n" for utt in feats))
    out = tmp_path / "out"
    (out / "k").mkdir(parents=True)
    (out / "k" / "frontend.json").write_text(FrontEnd.fbank().to_json())  # left by an earlier run
    data_prep.main(["--path-to-data", str(tmp_path), "--out-path", str(out), "--write-kaldi-feats", str(out / "k")])
    assert frontend.read_frontend(str(out / "train.hdf")) is None
    assert frontend.frontend_for_features(str(out / "k" / "feats.scp")) is None
    assert frontend.frontend_for_features(str(tmp_path / "feats.scp")) is None
    (tmp_path / "frontend.json").write_text("{not json")
    with pytest.raises(UserError, match="frontend.json.*not valid JSON"):
        frontend.frontend_for_features(str(tmp_path / "feats.scp"))
    with pytest.raises(UserError, match="not an HDF5"):
        frontend.read_frontend(str(tmp_path / "feats.scp"))


def test_load_wav_resamples_and_refuses(tmp_path):
    tone = sine(440, 16000, 1.0)
    write_wav(tmp_path / "tone16k.wav", tone, 16000)
    at8k = frontend.load_wav(tmp_path / "tone16k.wav", 8000)
    np.testing.assert_array_equal(
        at8k, resample_poly(tone.astype(np.int16).astype(np.float32), 1, 2).astype(np.float32)
    )
    assert len(at8k) == 8000 and at8k.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(at8k))
    assert np.argmax(spectrum) == 440  # 1 s of signal: bin k is k Hz
    same = frontend.load_wav(tmp_path / "tone16k.wav")
    np.testing.assert_array_equal(same, tone.astype(np.int16))
    # FrontEnd.compute resamples too: 16 kHz audio into an 8 kHz front end equals resampling first
    front = FrontEnd.mfcc(30, 8000)
    np.testing.assert_array_equal(front.compute(same, 16000), front.compute(at8k, 8000))
    with pytest.raises(UserError, match=r"int16 scale"):
        front.compute(same / 32768.0, 16000)
    write_wav(tmp_path / "stereo.wav", tone[:800], 16000, channels=2)
    with pytest.raises(UserError, match="stereo.wav has 2 channel.*not mono 16-bit"):
        frontend.load_wav(tmp_path / "stereo.wav", 16000)
    write_wav(tmp_path / "empty.wav", [], 16000)
    with pytest.raises(UserError, match="empty.wav holds no audio samples"):
        frontend.load_wav(tmp_path / "empty.wav", 16000)
    assert len(frontend.load_wav(tmp_path / "empty.wav", 16000, allow_empty=True)) == 0
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(UserError, match="zero.wav is not a 16-bit PCM wav"):
        frontend.load_wav(tmp_path / "zero.wav")
    with pytest.raises(UserError, match="cannot read .*missing.wav"):
        frontend.load_wav(tmp_path / "missing.wav")
