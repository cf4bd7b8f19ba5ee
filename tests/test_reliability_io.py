"""Reliability of the speech inputs and outputs: Kaldi paths with spaces, in-place overwrites, empty or
out-of-range feature matrices, odd HDF5 layouts, byte-order marks, unsupported devices, errors from
DataLoader workers, SIGTERM during a write, and minDCF's upper bound.

Bad-input cases run the real script in a fresh interpreter, as tests/test_bad_input.py does: one line on
stderr, a non-zero exit, no traceback, and the output folder exactly as it was.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import wave

import h5py
import kaldiio
import numpy as np
import pytest
import torch
from tiny_data import write_checkpoint, write_kaldi_dir

import data_prep
import embed
import eval as eval_script
from e2e_verification import speech_data
from e2e_verification.metrics import compute_metrics, compute_mindcf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TDNN_ARGS = {"ncoef": 23, "latent_size": 16}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Inputs shared by the cases (read-only for them)."""
    root = tmp_path_factory.mktemp("reliability_io")
    paths = {"root": str(root)}
    paths["tdnn"] = write_checkpoint(str(root / "tdnn.pt"), "TDNN", n_classes=3, encoder_args=TDNN_ARGS)
    paths["kaldi"] = str(root / "kaldi")
    write_kaldi_dir(paths["kaldi"], ncoef=23)
    # one utterance with a (0, 23) matrix, the others as usual
    paths["empty_utt"] = str(root / "empty_utt")
    feats = write_kaldi_dir(paths["empty_utt"], ncoef=23)
    feats["spk1-u1"] = np.zeros((0, 23), dtype=np.float32)
    kaldiio.save_ark(f"{paths['empty_utt']}/feats.ark", feats, scp=f"{paths['empty_utt']}/feats.scp")
    # feats.scp whose last entry points past the end of its ark
    paths["past_end"] = str(root / "past_end")
    write_kaldi_dir(paths["past_end"], ncoef=23)
    scp = f"{paths['past_end']}/feats.scp"
    lines = open(scp).read().splitlines()
    size = os.path.getsize(f"{paths['past_end']}/feats.ark")
    lines[-1] = f"{lines[-1].split()[0]} {paths['past_end']}/feats.ark:{size + 100}"
    open(scp, "w").write("\n".join(lines) + "\n")
    paths["past_end_utt"] = lines[-1].split()[0]
    # an HDF5 holding a dataset at its root besides a speaker group
    paths["h5_root_dataset"] = str(root / "root_dataset.h5")
    with h5py.File(paths["h5_root_dataset"], "w") as h5:
        h5.create_dataset("spk0-u0", data=np.zeros((23, 40), dtype=np.float32))
        h5.create_group("spk1").create_dataset("spk1-u0", data=np.zeros((23, 40), dtype=np.float32))
    (root / "trials_root_dataset").write_text("spk0-u0 spk1-u0 nontarget\nspk1-u0 spk1-u0 target\n")
    paths["trials_root_dataset"] = str(root / "trials_root_dataset")
    return paths


def snapshot(folder):
    """{relative path: bytes, a link's target, or None for a folder} of everything under `folder`."""
    found = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                found[os.path.relpath(path, folder)] = "link: " + os.readlink(path)
            elif os.path.isdir(path):
                found[os.path.relpath(path, folder)] = None
            else:
                found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def copy_kaldi_into(d, out):
    """A private copy of the Kaldi dir inside the output folder, so that the snapshot guards it too."""
    target = os.path.join(out, "data")
    shutil.copytree(d["kaldi"], target)
    text = open(os.path.join(target, "feats.scp")).read().replace(d["kaldi"], target)
    open(os.path.join(target, "feats.scp"), "w").write(text)
    return target


def prep_in_place(d, out):
    data = copy_kaldi_into(d, out)
    return "data_prep.py", ["--path-to-data", data, "--out-path", out, "--write-kaldi-feats", data]


def prep_in_place_through_link(d, out):
    data = copy_kaldi_into(d, out)
    os.symlink(data, os.path.join(out, "link"))
    argv = ["--path-to-data", data + "/feats.scp", "--out-path", out, "--out-name", "x.hdf"]
    return "data_prep.py", [*argv, "--write-kaldi-feats", os.path.join(out, "link") + "/"]


def prep_hdf5_over_scp(d, out):
    data = copy_kaldi_into(d, out)
    return "data_prep.py", ["--path-to-data", data, "--out-path", data, "--out-name", "utt2spk"]


def evaluate(d, out, data, trials, *argv):
    argv = ["--cp-path", d["tdnn"], "--test-data", data, "--trials-path", trials, *argv]
    return "eval.py", ["--device", "cpu", "--out-path", os.path.join(out, "scores.out"), *argv]


def embed_data(d, out, data, *argv):
    return "embed.py", ["--data", data, "--cp-path", d["tdnn"], "--out-path", out, "--device", "cpu", *argv]


def pipe_in_wav_scp(d, out):
    scp = os.path.join(out, "wav.scp")
    open(scp, "w").write("u1 sox /data/my file.flac -t wav - |\n")
    return "data_prep.py", ["--wav-scp", scp, "--out-path", out]


# (id, item of the issue list, builder(d, out) -> (script, argv), words the one error line must hold)
CASES = [
    ("data-prep-kaldi-feats-in-place", 6, prep_in_place, "would overwrite"),
    ("data-prep-kaldi-feats-in-place-via-link", 6, prep_in_place_through_link, "an input of this run"),
    ("data-prep-hdf5-over-its-utt2spk", 6, prep_hdf5_over_scp, "--out-path/--out-name would overwrite"),
    ("data-prep-wav-scp-pipe-still-refused", 8, pipe_in_wav_scp, "is a command or pipe"),
    (
        "eval-empty-matrix",
        11,
        lambda d, o: evaluate(d, o, d["empty_utt"], d["empty_utt"] + "/trials"),
        "utterance spk1-u1 of",
    ),
    ("embed-empty-matrix", 11, lambda d, o: embed_data(d, o, d["empty_utt"]), "has no frames"),
    (
        "eval-offset-past-end",
        12,
        lambda d, o: evaluate(d, o, d["past_end"], d["past_end"] + "/trials"),
        "past the end of",
    ),
    ("embed-offset-past-end", 12, lambda d, o: embed_data(d, o, d["past_end"]), "past the end of"),
    (
        "data-prep-offset-past-end",
        12,
        lambda d, o: ("data_prep.py", ["--path-to-data", d["past_end"], "--out-path", o]),
        "past the end of",
    ),
    (
        "eval-device-mps",
        16,
        lambda d, o: evaluate(d, o, d["kaldi"], d["kaldi"] + "/trials", "--device", "mps"),
        "only cpu, cuda and cuda:N",
    ),
    (
        "eval-device-meta",
        16,
        lambda d, o: evaluate(d, o, d["kaldi"], d["kaldi"] + "/trials", "--device", "meta"),
        "only cpu, cuda and cuda:N",
    ),
    (
        "eval-hdf5-dataset-at-root",
        16,
        lambda d, o: evaluate(d, o, d["h5_root_dataset"], d["trials_root_dataset"]),
        "`spk0-u0` at the root is a Dataset, not a speaker group",
    ),
    (
        "embed-hdf5-dataset-at-root",
        16,
        lambda d, o: embed_data(d, o, d["h5_root_dataset"]),
        "`spk0-u0` at the root is a Dataset",
    ),
    (
        "asterisk-set-zero-jobs",
        16,
        lambda d, o: ("tools/asterisk_set.py", ["--out", o + "/asterisk", "--jobs", "0", "--no-floor"]),
        "--jobs must be >= 1",
    ),
]


def run_script(script, argv, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.mark.parametrize("build, expected", [(c[2], c[3]) for c in CASES], ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing(d, tmp_path, build, expected):
    out = str(tmp_path / "out")
    os.makedirs(out)
    script, argv = build(d, out)
    before = snapshot(out)
    done = run_script(script, argv, out)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"exit 0; stdout: {done.stdout[-500:]}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{os.path.basename(script)}: error: ") and expected in lines[0], lines[0]
    after = snapshot(out)
    assert after == before, f"changed: {sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))}"


def test_offset_past_end_names_utterance_and_ark(d):
    """Item 12: the error names the utterance and the ark file, whichever script reads it."""
    with pytest.raises(speech_data.UserError) as err:
        list(speech_data.checked_features(d["past_end"], None, 23))
    message = str(err.value)
    assert f"utterance {d['past_end_utt']}" in message and f"{d['past_end']}/feats.ark" in message


# ----------------------------------------------------------------------------- 8: paths with spaces


def write_wav(path, samples, rate=8000):
    with wave.open(path, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.astype("<i2").tobytes())


def test_paths_with_spaces_go_from_wav_scp_through_data_prep_to_eval_and_embed(tmp_path, capsys):
    """Item 8: wav.scp listing `.../my data/...`, features written to `my exp/f`, read back by eval.py,
    embed.py and kaldiio, with the same numbers as the HDF5 data_prep wrote."""
    rng = np.random.default_rng(0)
    data, exp = tmp_path / "my data", tmp_path / "my exp"
    os.makedirs(data / "wavs")
    utt2spk = {}
    for s in range(3):
        for u in range(3):
            utt = f"spk{s}-u{u}"
            t = np.arange(4800) / 8000.0
            tone = 3000 * np.sin(2 * np.pi * (300 + 200 * s) * t) + rng.normal(0, 300, t.shape)
            write_wav(str(data / "wavs" / f"{utt} take 1.wav"), tone)
            utt2spk[utt] = f"spk{s}"
    (data / "wav.scp").write_text("".join(f"{u}  {data}/wavs/{u} take 1.wav \n" for u in utt2spk))
    (data / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in utt2spk.items()))
    utts = sorted(utt2spk)
    trials = "".join(
        f"{a} {b} {'target' if utt2spk[a] == utt2spk[b] else 'nontarget'}\n"
        for i, a in enumerate(utts)
        for b in utts[i + 1 :]
    )
    (data / "trials").write_text(trials)
    feats = str(exp / "f")
    data_prep.main(["--wav-scp", str(data / "wav.scp"), "--out-path", str(exp), "--out-name", "test.hdf",
                    "--write-kaldi-feats", feats, "--ncoef", "23"])  # fmt: skip
    scp = os.path.join(feats, "feats.scp")
    assert f"{exp}/f/feats.ark:" in open(scp).read()
    hdf = dict(speech_data.iter_features(str(exp / "test.hdf")))
    ours = dict(speech_data.iter_features(scp))
    theirs = {utt: np.asarray(mat) for utt, mat in kaldiio.load_scp(scp).items()}
    assert set(ours) == set(theirs) == set(hdf) == set(utt2spk)
    for utt in utts:
        np.testing.assert_array_equal(ours[utt], theirs[utt])
        np.testing.assert_array_equal(ours[utt], hdf[utt])
    cp = write_checkpoint(str(tmp_path / "tdnn.pt"), "TDNN", n_classes=3, encoder_args=TDNN_ARGS)
    scores = str(exp / "scores.out")
    eval_script.main(["--cp-path", cp, "--test-data", scp, "--trials-path", str(data / "trials"),
                      "--out-path", scores, "--device", "cpu"])  # fmt: skip
    scored = [line for line in open(scores).read().splitlines() if not line.startswith("#")]
    assert len(scored) == len(trials.splitlines())
    embed.main(["--data", scp, "--cp-path", cp, "--out-path", str(exp / "emb"), "--device", "cpu"])
    vectors = kaldiio.load_scp(str(exp / "emb" / "embeddings.scp"))
    assert set(vectors) == set(utts) and all(np.asarray(vectors[u]).shape == (512,) for u in utts)
    capsys.readouterr()


def test_scp_value_is_the_rest_of_the_line_and_only_pipes_are_commands(tmp_path):
    """Item 8: `key rxfilename`, the rxfilename keeping its inner spaces; Kaldi's pipe and stdin forms refused."""
    scp = tmp_path / "feats.scp"
    scp.write_text("a\t/x/my  exp/feats.ark:12 \nb /y/z.ark:3\n")
    assert speech_data.read_scp(scp) == [(1, "a", "/x/my  exp/feats.ark:12"), (2, "b", "/y/z.ark:3")]
    for value in ("gunzip -c f.ark.gz |", "| cat", "-"):
        scp.write_text(f"a {value}\n")
        with pytest.raises(speech_data.UserError, match="command or pipe"):
            speech_data.KaldiFeatures([str(scp)])


# ----------------------------------------------------------------------------- 18: byte-order marks


def test_text_tables_starting_with_a_byte_order_mark_are_read(tmp_path, d, capsys):
    """Item 18: trials, utt2spk, spk2utt and scp files saved with a UTF-8 BOM give clean ids."""
    bom = "\ufeff"
    for name in ("trials", "utt2spk", "spk2utt", "feats.scp"):
        (tmp_path / name).write_text(bom + open(os.path.join(d["kaldi"], name)).read(), encoding="utf-8")
    enroll, _, _ = speech_data.read_trials(tmp_path / "trials")
    assert enroll[0] == "spk0-u0"
    assert "spk0-u0" in speech_data.read_utt2spk(tmp_path / "utt2spk")
    assert "spk0" in speech_data.read_spk2utt(tmp_path / "spk2utt")
    assert speech_data.read_scp(tmp_path / "feats.scp")[0][1] == "spk0-u0"
    eval_script.main(["--cp-path", d["tdnn"], "--test-data", str(tmp_path / "feats.scp"),
                      "--trials-path", str(tmp_path / "trials"), "--device", "cpu"])  # fmt: skip
    assert "36 trials" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 14: DataLoader workers

WORKER_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from torch.utils.data import DataLoader, Dataset
from utils import UserError, cli

class Damaged(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise UserError("utterance spk0-u3 of train.hdf cannot be read: truncated")

def main(argv=None):
    for _ in DataLoader(Damaged(), num_workers=1):
        pass

cli(main)
"""


def test_user_error_in_a_dataloader_worker_is_one_line(tmp_path):
    """Item 14: torch re-raises a worker's UserError with its whole traceback in the message; cli prints
    the original message only."""
    script = tmp_path / "worker_error.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT.format(root=ROOT)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2
    assert lines == ["worker_error.py: error: utterance spk0-u3 of train.hdf cannot be read: truncated"], done.stderr


# ----------------------------------------------------------------------------- 19: SIGTERM


def test_sigterm_during_a_write_removes_the_temporary_file_and_exits_143(tmp_path):
    """Item 19: `timeout` and Slurm send SIGTERM; the HDF5 being written (under a temporary name) is removed."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    os.makedirs(data)
    utts = {f"s{i % 50}-u{i:05d}": rng.standard_normal((8, 20)).astype(np.float32) for i in range(30000)}
    kaldiio.save_ark(str(data / "feats.ark"), utts, scp=str(data / "feats.scp"))
    (data / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in utts))
    out = tmp_path / "out"
    os.makedirs(out)
    cmd = [sys.executable, os.path.join(ROOT, "data_prep.py"), "--path-to-data", str(data), "--out-path", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(name.endswith(".tmp") for name in os.listdir(out)):
            assert proc.poll() is None, f"data_prep ended before its temporary file was seen: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert code == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["terminated"], stderr
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------- 20: minDCF


def test_mindcf_is_at_most_one():
    """Item 20: rejecting everything costs exactly the normaliser; rounding used to give 1.0000000000000009."""
    scores = torch.tensor([0.0, 0.0, 1.0, 1.0])
    labels = torch.tensor([True, True, False, False])
    for p in (0.01, 0.05, 0.5):
        assert compute_mindcf(scores, labels, p) == 1.0
    metrics = compute_metrics(scores, labels)
    assert metrics["mindcf_0.01"] == metrics["mindcf_0.05"] == 1.0
    assert compute_mindcf(torch.tensor([1.0, 0.0]), torch.tensor([True, False]), 0.01) == 0.0


def test_sigterm_inside_a_finalizer_is_not_lost(tmp_path):
    """A SIGTERM that lands while a __del__ method or a weak-reference callback runs (h5py closes files in such
    callbacks) used to raise there, where Python prints "Exception ignored" and goes on: the run finished with
    exit 0. It is now raised again once ordinary code runs: one line, exit 143, the output not committed."""
    script = tmp_path / "slow_finalizer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys, time
            sys.path.insert(0, {ROOT!r})
            from utils import atomic_write, cli

            class Closes:
                def __del__(self):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)

            def main(argv):
                with atomic_write({str(tmp_path / "out.txt")!r}) as handle:
                    handle.write("partial")
                    Closes()
                    time.sleep(2)
                return 0

            cli(main)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == ["terminated"], done.stderr
    assert sorted(os.listdir(tmp_path)) == ["slow_finalizer.py"]
