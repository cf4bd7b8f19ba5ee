"""data_prep.py and speech_data.py: Kaldi sets written with kaldiio, real wav files, and the Asterisk prompts."""

import hashlib
import json
import os
import struct
import wave

import h5py
import kaldiio
import numpy as np
import pytest

import data_prep
from e2e_verification import speech_data
from tools import asterisk_set
from utils import UserError, cli

NCOEF = 30


def write_kaldi_set(folder, n_utts, rng, n_scp=1, prefix=""):
    """A Kaldi data dir: feats split over `n_scp` ark/scp pairs, spk2utt and utt2spk. Returns {utt: (spk, mat)}."""
    os.makedirs(folder, exist_ok=True)
    data = {}
    for spk, count in n_utts.items():
        for i in range(count):
            frames = int(rng.integers(1, 60))
            data[f"{prefix}{spk}-utt{i}"] = (prefix + spk, rng.standard_normal((frames, NCOEF)).astype(np.float32))
    utts = sorted(data)
    for part in range(n_scp):
        chunk = {utt: data[utt][1] for utt in utts[part::n_scp]}
        base = os.path.join(folder, f"raw_mfcc.{part + 1}")
        kaldiio.save_ark(base + ".ark", chunk, scp=base + ".scp")
    spk2utt = {}
    for utt in utts:
        spk2utt.setdefault(data[utt][0], []).append(utt)
    with open(os.path.join(folder, "utt2spk"), "w") as handle:
        handle.writelines(f"{utt} {data[utt][0]}\n" for utt in utts)
    with open(os.path.join(folder, "spk2utt"), "w") as handle:
        handle.writelines(f"{spk} {' '.join(u)}\n" for spk, u in sorted(spk2utt.items()))
    return data


def read_hdf(path):
    """{spk: {utt: array}} and root attributes of a data_prep HDF5."""
    with h5py.File(path, "r") as h5:
        return {spk: {utt: h5[spk][utt][()] for utt in h5[spk]} for spk in h5}, dict(h5.attrs)


def seed_argv(d1, d2, out, min_recordings):
    """The seed's data_prep command line, every flag spelled as in its README."""
    return [
        "--path-to-data", f"{d1}/", "--data-info-path", f"{d1}/",
        "--spk2utt", f"{d1}/spk2utt", "--utt2spk", f"{d1}/utt2spk",
        "--path-to-more-data", f"{d2}/", "--more-data-info-path", f"{d2}/",
        "--more-spk2utt", f"{d2}/spk2utt", "--more-utt2spk", f"{d2}/utt2spk",
        "--out-path", f"{out}/", "--out-name", "train.hdf", "--min-recordings", str(min_recordings),
    ]  # fmt: skip


def test_seed_command_line_merges_filters_and_transposes(tmp_path):
    rng = np.random.default_rng(0)
    first = write_kaldi_set(tmp_path / "vox1", {"spkA": 5, "spkB": 3, "spkC": 1}, rng, n_scp=2)
    more = write_kaldi_set(tmp_path / "vox2", {"spkD": 4, "spkE": 2}, rng, prefix="v2")
    inputs = {**first, **more}
    for min_rec, kept in ((3, {"spkA", "spkB", "v2spkD"}), (-1, {"spkA", "spkB", "spkC", "v2spkD", "v2spkE"})):
        data_prep.main(seed_argv(tmp_path / "vox1", tmp_path / "vox2", tmp_path / "out", min_rec))
        groups, attrs = read_hdf(tmp_path / "out" / "train.hdf")
        assert set(groups) == kept
        assert attrs["ncoef"] == NCOEF and attrs["format_version"] == speech_data.HDF5_FORMAT_VERSION
        expected = {utt for utt, (spk, _) in inputs.items() if spk in kept}
        assert {utt for utts in groups.values() for utt in utts} == expected
        for spk, utts in groups.items():
            for utt, array in utts.items():
                assert inputs[utt][0] == spk and array.dtype == np.float32
                np.testing.assert_array_equal(array, inputs[utt][1].T)
    assert sorted(os.listdir(tmp_path / "out")) == ["train.hdf"]


def test_kaldi_export_and_cmn(tmp_path):
    rng = np.random.default_rng(1)
    inputs = write_kaldi_set(tmp_path / "d", {"s1": 3, "s2": 2}, rng)
    argv = ["--path-to-data", str(tmp_path / "d" / "raw_mfcc.1.scp"), "--data-info-path", str(tmp_path / "d")]
    data_prep.main([*argv, "--out-path", str(tmp_path), "--cmn", "--write-kaldi-feats", str(tmp_path / "k")])
    groups, attrs = read_hdf(tmp_path / "train.hdf")
    assert bool(attrs["cmn"])
    exported = dict(kaldiio.load_scp_sequential(str(tmp_path / "k" / "feats.scp")))
    assert set(exported) == set(inputs)
    for utts in groups.values():
        for utt, array in utts.items():
            np.testing.assert_allclose(array.mean(axis=1), 0, atol=1e-5)
            np.testing.assert_allclose(array, inputs[utt][1].T - inputs[utt][1].mean(axis=0)[:, None], atol=1e-5)
            np.testing.assert_array_equal(exported[utt], array.T)
    assert speech_data.read_utt2spk(tmp_path / "k" / "utt2spk") == {u: s for u, (s, _) in inputs.items()}
    assert {utt for utt, _ in speech_data.iter_features(str(tmp_path / "k"))} == set(inputs)
    hdf_feats = dict(speech_data.iter_features(str(tmp_path / "train.hdf"), wanted=["s1-utt0"]))
    assert list(hdf_feats) == ["s1-utt0"]
    with pytest.raises(UserError, match="missing"):
        list(speech_data.iter_features(str(tmp_path / "k"), wanted=["nobody-utt9"]))


def test_failure_leaves_no_output(tmp_path, capsys):
    rng = np.random.default_rng(2)
    write_kaldi_set(tmp_path / "d", {"s1": 4}, rng)
    ark = tmp_path / "d" / "raw_mfcc.1.ark"
    ark.write_bytes(ark.read_bytes()[: ark.stat().st_size // 2])
    out = tmp_path / "out"
    argv = ["--path-to-data", str(tmp_path / "d"), "--out-path", str(out), "--write-kaldi-feats", str(out / "k")]
    with pytest.raises(SystemExit) as stop:
        cli(data_prep.main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: cannot read Kaldi matrix" in err.strip().splitlines()[-1]
    assert os.listdir(out) == ["k"] and os.listdir(out / "k") == []


def test_table_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "utt2spk"
    bad.write_text("u1 s1\nu2 s2 extra\n")
    with pytest.raises(UserError, match=r"utt2spk line 2"):
        speech_data.read_utt2spk(bad)
    trials = tmp_path / "trials"
    trials.write_text("a b target\nb c nontarget\nc d maybe\n")
    with pytest.raises(UserError, match=r"trials line 3"):
        speech_data.read_trials(trials)
    trials.write_text("a b target\nb c nontarget\nc d target")  # no final newline: still a target
    enroll, test, target = speech_data.read_trials(trials)
    assert enroll == ["a", "b", "c"] and test == ["b", "c", "d"] and target.tolist() == [True, False, True]
    scp = tmp_path / "wav.scp"
    scp.write_text("u1 sox in.flac -t wav - |\n")
    with pytest.raises(UserError, match=r"wav.scp line 1: .*no shell is run"):
        speech_data.read_wav_scp(scp)
    scp.write_text(f"u1 {tmp_path}/missing.wav\n")
    with pytest.raises(UserError, match=r"line 1: audio file not found"):
        speech_data.read_wav_scp(scp)
    bad.write_text("u1 s1\n")
    (tmp_path / "spk2utt").write_text("s1 u1 u2\n")
    with pytest.raises(UserError, match="disagree on utterance u2"):
        speech_data.speaker_info(str(tmp_path))


def write_wav(path, rate, n_samples, seed, channels=1):
    """A sine plus noise at the int16 scale, written with the stdlib."""
    t = np.arange(n_samples) / rate
    noise = np.random.default_rng(seed).standard_normal(n_samples)
    signal = (3000 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 300 * noise).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.repeat(signal, channels).tobytes())


@pytest.mark.parametrize("rate", [8000, 16000])
def test_wav_front_end_shapes(tmp_path, rate):
    lengths = {"alice": [rate + 37, rate // 3], "bob": [2 * rate + 5, 81]}
    for spk, sizes in lengths.items():
        os.makedirs(tmp_path / "wavs" / spk / "session1")
        for i, n in enumerate(sizes):
            write_wav(tmp_path / "wavs" / spk / "session1" / f"{i}.wav", rate, n, seed=i)
    data_prep.main(["--wav-dir", str(tmp_path / "wavs"), "--out-path", str(tmp_path), "--out-name", "w.hdf"])
    groups, attrs = read_hdf(tmp_path / "w.hdf")
    assert attrs["sample_rate"] == rate and attrs["ncoef"] == NCOEF
    shift = rate // 100  # 10 ms; Kaldi with --snip-edges=false makes round(samples / shift) frames
    for spk, sizes in lengths.items():
        for i, n in enumerate(sizes):
            array = groups[spk][f"{spk}-session1-{i}"]
            assert array.shape == (NCOEF, (n + shift // 2) // shift)
            assert array.dtype == np.float32 and np.isfinite(array).all()
            assert np.abs(array).max() > 0


def test_wav_reader_refuses_other_formats(tmp_path):
    write_wav(tmp_path / "stereo.wav", 8000, 800, seed=0, channels=2)
    with pytest.raises(UserError, match="not mono 16-bit.*sox"):
        speech_data.read_wav(str(tmp_path / "stereo.wav"))
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)  # IEEE float, which the stdlib wave cannot read
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 16) + bytes(16)
    (tmp_path / "float.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(UserError, match="not a 16-bit PCM wav.*sox"):
        speech_data.read_wav(str(tmp_path / "float.wav"))


asterisk = pytest.mark.skipif(not os.path.isdir(asterisk_set.SOUNDS), reason="Asterisk prompt packages not installed")


@asterisk
def test_asterisk_scan_handles_the_traps():
    prompts = asterisk_set.scan_prompts()
    by_spk = {}
    for prompt in prompts:
        by_spk.setdefault(prompt["spk"], set()).add(prompt["lang"])
    assert by_spk == {
        "allison": {"en", "es"}, "june": {"fr"}, "carlo": {"it"}, "paola": {"it"},
        "ivrvoice": {"ru"}, "july": {"es"}, "armelle": {"fr"},
    }  # fmt: skip
    assert len({p["src"] for p in prompts}) == len(prompts) > 3800
    assert not any("/silence/" in p["src"] or p["utt"].endswith("-beep") for p in prompts)
    assert sum(p["src"].endswith(".gsm") for p in prompts) > 500
    assert sum(p["utt"] in ("july-es-transfer", "july-es-transfer2") for p in prompts) == 1  # same bytes twice


@asterisk
def test_asterisk_subset_end_to_end(tmp_path, capsys):
    out = tmp_path / "ast"
    asterisk_set.main(["--out", str(out), "--max-per-speaker", "6", "--seed", "3"])
    assert "floor" in capsys.readouterr().out
    all_utt2spk = speech_data.read_utt2spk(out / "all" / "utt2spk")
    assert len(set(all_utt2spk.values())) == 7
    test_spk = set(speech_data.read_utt2spk(out / "test" / "utt2spk").values())
    train_spk = set(speech_data.read_utt2spk(out / "train" / "utt2spk").values())
    assert len(test_spk) == 2 and not test_spk & train_spk
    assert set(speech_data.read_utt2spk(out / "valid" / "utt2spk").values()) == train_spk
    enroll, test, target = speech_data.read_trials(out / "test" / "trials")
    assert 0 < target.sum() == (~target).sum()

    feats = tmp_path / "test_feats"
    data_prep.main(["--wav-scp", str(out / "test" / "wav.scp"), "--out-path", str(tmp_path), "--out-name",
                    "test.hdf", "--write-kaldi-feats", str(feats)])  # fmt: skip
    groups, attrs = read_hdf(tmp_path / "test.hdf")
    assert attrs["sample_rate"] == 8000 and set(groups) == test_spk
    exported = kaldiio.load_scp(str(feats / "feats.scp"))
    assert set(enroll) | set(test) <= set(exported)
    for utts in groups.values():
        for utt, array in utts.items():
            np.testing.assert_array_equal(exported[utt], array.T)

    wavs = speech_data.read_wav_scp(out / "test" / "wav.scp")
    eer = asterisk_set.stats_cosine_eer(list(wavs.values()), [all_utt2spk[u] for u in wavs])
    assert 0.0 <= eer <= 1.0


def test_help_ends_with_an_example(capsys):
    with pytest.raises(SystemExit):
        data_prep.main(["--help"])
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].strip().startswith("--") and any(line.startswith("example") for line in lines[-4:])


# sha256 of the datasets (name, shape, dtype, bytes) and of the exported ark, taken with the MFCC-only
# data_prep.py before fbank, augmentation and the recorded front end were added: the default path must
# stay bit for bit the same. (A new kaldi-native-fbank release may change the numbers themselves.)
GOLDEN = {
    "scp": "66521915f79230b34ed1624c3bb462f358081a5fc4e8e0c14af26bd3acb9f91f",
    "dir_cmn_23": "023937b7d8f30ebfc693a32be492472ded36e9ac7a7dcfa6f52c41b856ff2840",
    "sine_16k": "95308bebbc8958d27aa512b8990e9f8ebb6ffcfd6d14fb6a6ae68eedf5f992a8",
    "ark": "fe57ff3adf483717811845995e0424a2b8aa070af7ad3de61463de556c72e841",
}
GOLDEN_PROMPTS = {
    spk: [f"{folder}/{name}.wav" for name in ("activated", "calling", "cancelled", "digits/1")]
    for spk, folder in (("allison", "en_US_f_Allison"), ("june", "fr_CA_f_June"), ("carlo", "it_IT_m_Carlo"))
}


def hash_hdf(path):
    """sha256 over every dataset's group/name, shape, dtype and bytes, in sorted order."""
    digest = hashlib.sha256()
    with h5py.File(path, "r") as h5:
        for spk in sorted(h5):
            for utt in sorted(h5[spk]):
                array = h5[spk][utt][()]
                digest.update(f"{spk}/{utt}{array.shape}{array.dtype}".encode())
                digest.update(array.tobytes())
    return digest.hexdigest()


@asterisk
def test_mfcc_output_is_unchanged_bit_for_bit(tmp_path):
    with open(tmp_path / "wav.scp", "w") as scp, open(tmp_path / "utt2spk", "w") as u2s:
        for spk, names in sorted(GOLDEN_PROMPTS.items()):
            for name in names:
                utt = f"{spk}-{name.split('/')[-1]}"
                scp.write(f"{utt} {asterisk_set.SOUNDS}/{name}\n")
                u2s.write(f"{utt} {spk}\n")
            os.makedirs(tmp_path / "dir" / spk)
            for name in names:
                os.symlink(f"{asterisk_set.SOUNDS}/{name}", tmp_path / "dir" / spk / name.replace("/", "_"))
    out = ["--out-path", str(tmp_path)]
    data_prep.main(["--wav-scp", str(tmp_path / "wav.scp"), *out, "--out-name", "a.hdf",
                    "--write-kaldi-feats", str(tmp_path / "ka")])  # fmt: skip
    data_prep.main(["--wav-dir", str(tmp_path / "dir"), *out, "--out-name", "b.hdf", "--cmn", "--ncoef", "23"])
    t = np.arange(40000) / 16000
    sig = (3000 * np.sin(2 * np.pi * 310 * t) + 300 * np.random.default_rng(5).standard_normal(40000)).astype("<i2")
    os.makedirs(tmp_path / "gen" / "s")
    with wave.open(str(tmp_path / "gen" / "s" / "x.wav"), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(sig.tobytes())
    data_prep.main(["--wav-dir", str(tmp_path / "gen"), *out, "--out-name", "c.hdf"])
    hashes = {name: hash_hdf(tmp_path / f"{name[0]}.hdf") for name in ("a", "b", "c")}
    assert [hashes["a"], hashes["b"], hashes["c"]] == [GOLDEN["scp"], GOLDEN["dir_cmn_23"], GOLDEN["sine_16k"]]
    assert hashlib.sha256((tmp_path / "ka" / "feats.ark").read_bytes()).hexdigest() == GOLDEN["ark"]
    _, attrs = read_hdf(tmp_path / "b.hdf")
    assert attrs["source"] == "wav-mfcc" and attrs["ncoef"] == 23 and bool(attrs["cmn"])


@pytest.mark.parametrize("rate", [8000, 16000])
def test_fbank_front_end(tmp_path, rate):
    for spk, seed in (("alice", 0), ("bob", 1)):
        os.makedirs(tmp_path / "wavs" / spk)
        write_wav(tmp_path / "wavs" / spk / "0.wav", rate, rate + 123, seed=seed)
    argv = ["--wav-dir", str(tmp_path / "wavs"), "--out-path", str(tmp_path), "--feature", "fbank"]
    data_prep.main(argv)
    groups, attrs = read_hdf(tmp_path / "train.hdf")
    frames = (rate + 123 + rate // 200) // (rate // 100)
    assert groups["alice"]["alice-0"].shape == (80, frames) and attrs["ncoef"] == 80
    assert attrs["source"] == "wav-fbank"
    recorded = json.loads(attrs["frontend"])
    assert recorded["kind"] == "fbank" and recorded["num_mel_bins"] == 80 and recorded["sample_rate"] == rate
    data_prep.main([*argv, "--num-mel-bins", "40", "--out-name", "f40.hdf"])
    assert read_hdf(tmp_path / "f40.hdf")[0]["bob"]["bob-0"].shape == (40, frames)
    with pytest.raises(UserError, match="width is --num-mel-bins"):
        data_prep.main([*argv, "--ncoef", "30"])
    with pytest.raises(UserError, match="--num-mel-bins 20 is below the 30 MFCC"):
        data_prep.main([*argv[:-2], "--num-mel-bins", "20"])
    data_prep.main([*argv[:-2], "--num-mel-bins", "40", "--out-name", "m.hdf"])
    groups, attrs = read_hdf(tmp_path / "m.hdf")
    assert groups["bob"]["bob-0"].shape == (30, frames) and json.loads(attrs["frontend"])["num_mel_bins"] == 40


def test_mixed_rates_need_sample_rate(tmp_path, capsys):
    os.makedirs(tmp_path / "wavs" / "s")
    write_wav(tmp_path / "wavs" / "s" / "a.wav", 8000, 8000, seed=0)
    write_wav(tmp_path / "wavs" / "s" / "b.wav", 16000, 16000, seed=1)
    argv = ["--wav-dir", str(tmp_path / "wavs"), "--out-path", str(tmp_path)]
    with pytest.raises(UserError, match="b.wav is sampled at 16000 Hz, earlier files at 8000 Hz.*--sample-rate"):
        data_prep.main(argv)
    data_prep.main([*argv, "--sample-rate", "8000"])
    assert "resampled to 8000 Hz: 1 utterances" in capsys.readouterr().out
    groups, attrs = read_hdf(tmp_path / "train.hdf")
    assert attrs["sample_rate"] == 8000 and groups["s"]["s-b"].shape == (30, 100)
