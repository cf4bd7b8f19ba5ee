"""The VoxCeleb recipe (recipes/voxceleb/run.sh) end to end on a tiny stand-in laid out as VoxCeleb, built by
tools/voxceleb_standin.py from Debian's Asterisk prompts; and its one-line refusals of bad input."""

import math
import os
import re
import shutil
import subprocess
import sys
import wave

import pytest

from e2e_verification import speech_data
from e2e_verification.calibration import read_scores
from e2e_verification.metrics import compute_eer
from tools import asterisk_set, voxceleb_standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "recipes", "voxceleb", "run.sh")
LISTS = ("veri_test.txt", "veri_test2.txt", "list_test_all2.txt", "list_test_hard2.txt")
# A TDNN small enough for 2 CPU cores: 40 filterbanks, 2 epochs of 3 speakers, a 64-wide distance.
TINY = ["--model", "TDNN", "--num-mel-bins", "40", "--epochs", "2", "--batch-size", "3", "--n-frames", "200",
        "--lr", "0.1", "--warmup", "10", "--workers", "0", "--device", "cpu", "--avg-num", "2", "--cohort-top-n", "10",
        "--ft-epochs", "2", "--ft-n-frames", "300", "--ft-avg-num", "2",
        "--train-args", "--latent-size 64 --hidden-size 64 --verbose 0"]  # fmt: skip
ROWS = ("Vox1-O", "Vox1-O-clean", "Vox1-E-clean", "Vox1-H-clean")

pytestmark = pytest.mark.skipif(
    not os.path.isdir(asterisk_set.SOUNDS) or shutil.which("sox") is None,
    reason="Asterisk prompt packages or sox not installed",
)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in: 7 voices, 2 videos of 3 prompts each."""
    out = str(tmp_path_factory.mktemp("vox") / "voxceleb")
    assert voxceleb_standin.main(["--out", out, "--seed", "0"]) == 0
    return out


def run_recipe(*args):
    """bash run.sh with this Python; -> the finished process (stdout, stderr, returncode)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    cmd = ["bash", RUN, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


def read_official(path):
    """[(label, enroll, test)] of an official list."""
    with open(path) as handle:
        return [tuple(line.split()) for line in handle]


def test_standin_is_laid_out_as_voxceleb(standin):
    meta = {}
    with open(os.path.join(standin, "vox1", "vox1_meta.csv")) as handle:
        for line in list(handle)[1:]:
            spk, _, _, nation, subset = line.rstrip("\n").split("\t")
            meta[spk] = (nation, subset)
    for subset, pattern in (("vox1", r"id1\d{4}/[\w-]{11}/\d{5}\.wav"), ("vox2", r"id0\d{4}/[\w-]{11}/\d{5}\.wav")):
        root = os.path.join(standin, subset, "wav")
        found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
        assert len(found) == len({os.path.dirname(os.path.dirname(f)) for f in found}) * 6
        for name in found:
            assert re.fullmatch(pattern, name), name
            with wave.open(os.path.join(root, name), "rb") as wav:
                assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
    lists = {name: read_official(os.path.join(standin, "vox1", name)) for name in LISTS}
    for name, trials in lists.items():
        for label, a, b in trials:
            assert os.path.isfile(os.path.join(standin, "vox1", "wav", a)) and os.path.isfile(
                os.path.join(standin, "vox1", "wav", b)
            )
            assert label == str(int(a.split("/")[0] == b.split("/")[0])), (name, a, b)
        assert {label for label, _, _ in trials} == {"0", "1"}
    o_speakers = {utt.split("/")[0] for _, a, b in lists["veri_test.txt"] for utt in (a, b)}
    assert {meta[spk][1] for spk in o_speakers} == {"test"}
    assert set(lists["veri_test2.txt"]) < set(lists["veri_test.txt"])
    assert {utt.split("/")[0] for _, a, b in lists["list_test_all2.txt"] for utt in (a, b)} == set(meta)
    for _, a, b in lists["list_test_hard2.txt"]:
        assert meta[a.split("/")[0]][0] == meta[b.split("/")[0]][0]  # same nationality


def eer_tables(stdout):
    """{table title: {row: [EER cells]}} of the Markdown tables the recipe prints."""
    tables, title = {}, None
    for line in stdout.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = {}
        elif title and line.startswith("| Vox1-"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[title][cells[0]] = cells[1:]
    return tables


def test_recipe_runs_every_stage(standin, tmp_path):
    exp = str(tmp_path / "exp")
    done = run_recipe("--data", standin, "--exp", exp, "--stage", "1", "--stop-stage", "10", *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for number in range(1, 11):
        assert f"stage {number}:" in done.stdout
    for model in (exp, f"{exp}/lm"):
        for name in ("cp/checkpoint_2ep.pt", "avg_model.pt", "calibration.json", "embeddings/vox1/embeddings.h5",
                     "embeddings/vox2/embeddings.h5", "scores/vox1_all.score.json", "scores/vox1_all.asnorm.score",
                     "scores/vox1_dev.asnorm.score", "scores/vox1_all.calibrated.score"):  # fmt: skip
            assert os.path.isfile(os.path.join(model, name)), name
    for name in ("data/vox1/wav.scp", "data/vox2/utt2spk", "feats/vox2_train.hdf", "feats/vox1.hdf",
                 "onnx/encoder.onnx", "onnx/distance.onnx"):  # fmt: skip
        assert os.path.isfile(os.path.join(exp, name)), name
    assert len(speech_data.read_wav_scp(f"{exp}/data/vox1/wav.scp")) == 24

    tables = eer_tables(done.stdout)
    assert list(tables) == ["EER (%): averaged model", "EER (%): large-margin fine-tuned"]
    for rows in tables.values():
        assert tuple(rows) == ROWS
        for cells in rows.values():
            assert len(cells) == 6 and all(0 <= float(c) <= 100 and math.isfinite(float(c)) for c in cells)
    # each row is its own list's EER, read out of the union's score file
    scores = read_scores(f"{exp}/scores/vox1_all.score", ["cos"], ids=True)
    by_pair = dict(zip(zip(scores.enroll, scores.test), scores.columns["cos"]))
    for row, name in zip(ROWS, ("vox1_O", "vox1_O_cleaned", "vox1_E_cleaned", "vox1_H_cleaned")):
        enroll, test, target = speech_data.read_trials(f"{exp}/data/trials/{name}")
        eer = compute_eer([by_pair[pair] for pair in zip(enroll, test)], target)
        assert tables["EER (%): averaged model"][row][0] == f"{100 * eer:.2f}"


def damaged_copy(standin, tmp_path, damage):
    """A copy of the stand-in with one thing wrong."""
    data = str(tmp_path / "data")
    shutil.copytree(standin, data)
    if damage == "missing list":
        os.remove(os.path.join(data, "vox1", "veri_test2.txt"))
    elif damage == "flat layout":  # one utterance without its video folder
        speaker = os.path.join(data, "vox1", "wav", "id10270")
        video = sorted(os.listdir(speaker))[0]
        name = sorted(os.listdir(os.path.join(speaker, video)))[0]
        os.rename(os.path.join(speaker, video, name), os.path.join(speaker, name))
    elif damage == "no vox2":
        shutil.rmtree(os.path.join(data, "vox2"))
    return data


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing list", "missing trial list"),
        ("flat layout", "off the VoxCeleb layout"),
        ("no vox2", "is not laid out as VoxCeleb"),
    ],
)
def test_bad_data_is_refused_in_one_line(standin, tmp_path, damage, message):
    data = damaged_copy(standin, tmp_path, damage)
    exp = tmp_path / "exp"
    done = run_recipe("--data", data, "--exp", str(exp), "--stage", "1", "--stop-stage", "10", *TINY)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not exp.exists()  # nothing half written


@pytest.mark.parametrize(
    "stages", [("--stage", "0"), ("--stop-stage", "11"), ("--stage", "4", "--stop-stage", "3"), ("--stage", "x")]
)
def test_stage_out_of_range_is_refused_in_one_line(standin, tmp_path, stages):
    exp = tmp_path / "exp"
    done = run_recipe("--data", standin, "--exp", str(exp), *stages)
    assert done.returncode != 0 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "stage" in done.stderr, done.stderr
    assert not exp.exists()
