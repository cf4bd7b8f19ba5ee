"""Reliability, third pass: outputs that would replace an input, artifacts made by another model, cohorts that
give non-finite scores, and output paths checked before any work (eval.py, embed.py, train_plda.py,
data_prep.py and the guard in utils that they share).

Every bad input runs the real script in a fresh interpreter: one line on stderr, exit 2, no traceback, and
the folder it would have written to exactly as it was (snapshot before and after).
"""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_reliability_io import snapshot
from tiny_data import make_image_tree, write_checkpoint, write_kaldi_dir

import utils
from e2e_verification.checkpoints import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device", "cpu"]
SMALL_ECAPA = {"ncoef": 23, "channels": 16, "embedding_size": 6, "latent_size": 8, "mfa_channels": 32}
SMALL_ECAPA.update(se_bottleneck=8, attention_bottleneck=8)
UNWRITABLE = "/proc/self"  # a folder no one can create files in, root included


def run(script, *argv, cwd=None):
    """The real script in a fresh interpreter -> CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd or ROOT)


def refused(done, *expected):
    """Assert one line on stderr, exit 2, no traceback, each of `expected` in the line; return the line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Two speech checkpoints of the same architecture (different weights), features, trials, embeddings."""
    root = tmp_path_factory.mktemp("reliability_outputs")
    paths = {"root": root, "kaldi": str(root / "kaldi")}
    write_kaldi_dir(paths["kaldi"], n_speakers=4, n_utts=4, ncoef=23)
    paths["cp"] = write_checkpoint(str(root / "a.pt"), "ECAPA_TDNN", 4, SMALL_ECAPA, seed=0)
    paths["other"] = write_checkpoint(str(root / "b.pt"), "ECAPA_TDNN", 4, SMALL_ECAPA, seed=1)
    paths["trials"] = paths["kaldi"] + "/trials"
    for name, cp in (("emb", paths["cp"]), ("emb_other", paths["other"])):
        paths[name] = str(root / name)
        argv = ["--data", paths["kaldi"], "--utt2spk", paths["kaldi"] + "/utt2spk", "--cp-path", cp]
        done = run("embed.py", *argv, "--out-path", paths[name], "--min-frames", "100", *CPU)
        assert done.returncode == 0, done.stderr
    return paths


def eval_argv(d, *extra, cp=None):
    return ["--cp-path", cp or d["cp"], "--test-data", d["kaldi"], "--trials-path", d["trials"], *CPU, *extra]


# ----------------------------------------------------------------------------- A: outputs that are inputs


@pytest.mark.parametrize("which", ["cp", "trials", "calibration-json"])
def test_item1_eval_out_path_never_replaces_an_input(d, tmp_path, which):
    """eval.py --out-path equal to --cp-path or --trials-path (item 1), or whose metrics JSON <out>.json is the
    --calibration file (an instance of the same class nobody listed): refused, the input byte for byte intact."""
    victim = tmp_path / "victim"
    if which == "cp":
        shutil.copy(d["cp"], victim)
        argv = eval_argv(d, "--out-path", victim, cp=str(victim))
    elif which == "trials":
        shutil.copy(d["trials"], victim)
        argv = ["--cp-path", d["cp"], "--test-data", d["kaldi"], "--trials-path", victim, "--out-path", victim, *CPU]
    else:
        victim = tmp_path / "dev.out.json"
        victim.write_text(json.dumps({"p_target": 0.01, "calibrations": {"cos": {"a": 1.0, "b": 0.0}}, "fusions": {}}))
        argv = eval_argv(d, "--out-path", tmp_path / "dev.out", "--calibration", victim)
    before = snapshot(str(tmp_path))
    refused(run("eval.py", *argv), "would overwrite", str(victim.name), "an input of this run")
    assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("given", ["feats.scp", "its folder"])
def test_eval_out_path_never_replaces_the_ark_a_feats_scp_names(d, tmp_path, given):
    """The table an input names is an input too: --out-path equal to the ark behind --test-data's feats.scp (given
    as the file or as its folder, absolute or relative ark paths) is refused, the ark byte for byte intact."""
    kaldi = tmp_path / "kaldi"
    shutil.copytree(d["kaldi"], kaldi)
    ark = kaldi / "feats.ark"
    lines = (kaldi / "feats.scp").read_text().splitlines()
    # the copy's own ark, named relative to the folder the command runs in (Kaldi readers start from there)
    (kaldi / "feats.scp").write_text(
        "".join(f"{ln.split()[0]} kaldi/feats.ark:{ln.rsplit(':', 1)[1]}\n" for ln in lines)
    )
    data = kaldi / "feats.scp" if given == "feats.scp" else kaldi
    argv = ["--cp-path", d["cp"], "--test-data", data, "--trials-path", d["trials"], "--out-path", ark, *CPU]
    before = snapshot(str(tmp_path))
    refused(run("eval.py", *argv, cwd=tmp_path), "would overwrite kaldi/feats.ark", "feats.scp names it")
    assert snapshot(str(tmp_path)) == before


def test_train_distance_out_never_replaces_its_held_out_embeddings(d, tmp_path):
    """--valid-embeddings given as embed.py's folder: its embeddings.h5 is an input, so --out cannot be it."""
    emb, held = tmp_path / "emb", tmp_path / "held"
    shutil.copytree(d["emb"], emb)
    shutil.copytree(d["emb_other"], held)
    out = held / "embeddings.h5"
    before = snapshot(str(tmp_path))
    done = run("train_distance.py", "--embeddings", emb, "--valid-embeddings", held, "--out", out, *CPU)
    refused(done, "would overwrite", "--valid-embeddings file", "an input of this run")
    assert snapshot(str(tmp_path)) == before


def test_item1_a_hard_link_to_the_checkpoint_is_the_same_file(d, tmp_path):
    """The guard compares files, not spellings: a hard link to the checkpoint is refused as an output."""
    cp = tmp_path / "cp.pt"
    shutil.copy(d["cp"], cp)
    os.link(cp, tmp_path / "link.out")
    before = snapshot(str(tmp_path))
    refused(run("eval.py", *eval_argv(d, "--out-path", tmp_path / "link.out", cp=str(cp))), "would overwrite")
    assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("which", ["embeddings-file", "utt2spk"])
def test_item3_train_plda_out_never_replaces_its_embeddings(d, tmp_path, which):
    emb = tmp_path / "emb"
    shutil.copytree(d["emb"], emb)
    shutil.copy(d["kaldi"] + "/utt2spk", emb / "utt2spk")
    out = emb / ("embeddings.h5" if which == "embeddings-file" else "utt2spk")
    before = snapshot(str(tmp_path))
    done = run("train_plda.py", "--embeddings", emb, "--utt2spk", emb / "utt2spk", "--out", out)
    refused(done, "would overwrite", "an input of this run")
    assert snapshot(str(tmp_path)) == before


def test_item17_train_plda_out_checked_before_reading_or_fitting(tmp_path):
    """--out that is a folder, lies under a file, or is in a missing folder: refused before the embeddings
    are even read (here they are not embeddings at all, and the --out message comes first)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    bogus = tmp_path / "embeddings.h5"
    bogus.write_text("not hdf5\n")
    for out, message in (
        (tmp_path / "folder", "is a folder"),
        (tmp_path / "afile" / "plda.json", "which is a file"),
        (tmp_path / "missing" / "plda.json", "output folder does not exist"),
    ):
        refused(run("train_plda.py", "--embeddings", bogus, "--out", out), "--out", message)


@pytest.mark.parametrize("script", ["train_plda.py", "embed.py", "data_prep.py", "eval.py"])
def test_item18_unwritable_output_folder_is_one_line(d, script):
    argv = {
        "train_plda.py": ["--embeddings", d["emb"], "--out", f"{UNWRITABLE}/plda.json"],
        "embed.py": ["--data", d["kaldi"], "--cp-path", d["cp"], "--out-path", f"{UNWRITABLE}/emb", *CPU],
        "data_prep.py": ["--path-to-data", d["kaldi"], "--out-path", f"{UNWRITABLE}/data", "--ncoef", "23"],
        "eval.py": eval_argv(d, "--out-path", f"{UNWRITABLE}/scores.out"),
    }[script]
    refused(run(script, *argv), "cannot write in output folder")


# ----------------------------------------------------------------------------- B: provenance


def test_item8_embeddings_record_the_checkpoint_that_made_them(d):
    with h5py.File(os.path.join(d["emb"], "embeddings.h5"), "r") as h5:
        record = json.loads(h5.attrs["provenance"])
    with h5py.File(os.path.join(d["emb_other"], "embeddings.h5"), "r") as h5:
        other = json.loads(h5.attrs["provenance"])
    assert record["checkpoint"] == os.path.abspath(d["cp"]) and record["model"] == "ECAPA_TDNN"
    assert len(record["weights_sha256"]) == 16 and record["weights_sha256"] != other["weights_sha256"]


def test_item8_score_files_record_the_model_text_npz_and_json(d, tmp_path):
    from e2e_verification import scoring

    for name, fmt in (("s.out", "text"), ("s.npz", "npy")):
        out = tmp_path / name
        assert run("eval.py", *eval_argv(d, "--out-path", out, "--score-format", fmt)).returncode == 0
        summary = json.load(open(f"{out}.json"))
        assert summary["provenance"]["checkpoint"] == os.path.abspath(d["cp"])
    first = open(tmp_path / "s.out").readline()
    assert json.loads(first[len(scoring.PROVENANCE_LINE) :]) == summary["provenance"]
    with np.load(tmp_path / "s.npz") as npz:
        assert json.loads(str(npz["provenance"])) == summary["provenance"]


def test_item8_cohort_embedded_by_another_checkpoint_is_refused(d, tmp_path):
    cohort = os.path.join(d["emb_other"], "embeddings.h5")
    out = tmp_path / "scores.out"
    line = refused(run("eval.py", *eval_argv(d, "--out-path", out, "--cohort", cohort)), "--allow-other-model")
    assert os.path.abspath(d["other"]) in line and os.path.abspath(d["cp"]) in line
    assert os.listdir(tmp_path) == []
    done = run("eval.py", *eval_argv(d, "--out-path", out, "--cohort", cohort, "--allow-other-model"))
    assert done.returncode == 0 and "warning:" in done.stderr and out.exists(), done.stderr
    same = os.path.join(d["emb"], "embeddings.h5")  # made by --cp-path itself: used without a word
    done = run("eval.py", *eval_argv(d, "--out-path", out, "--cohort", same))
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr


def test_item8_plda_trained_on_another_models_embeddings_is_refused(d, tmp_path):
    plda = tmp_path / "plda.json"
    done = run("train_plda.py", "--embeddings", d["emb_other"], "--out", plda)
    assert done.returncode == 0, done.stderr
    assert json.load(open(plda))["provenance"]["checkpoint"] == os.path.abspath(d["other"])
    refused(run("eval.py", *eval_argv(d, "--out-path", tmp_path / "s.out", "--plda", plda)), "the --plda model")
    assert not (tmp_path / "s.out").exists()
    done = run("eval.py", *eval_argv(d, "--out-path", tmp_path / "s.out", "--plda", plda, "--allow-other-model"))
    assert done.returncode == 0, done.stderr


def test_item8_calibration_fitted_on_another_models_scores_is_refused(d, tmp_path):
    dev = tmp_path / "dev.out"
    assert run("eval.py", *eval_argv(d, "--out-path", dev, cp=d["other"])).returncode == 0
    cal = tmp_path / "cal.json"
    done = run("calibrate.py", "--scores", dev, "--out", cal)
    assert done.returncode == 0, done.stderr
    assert json.load(open(cal))["provenance"]["checkpoint"] == os.path.abspath(d["other"])
    refused(run("eval.py", *eval_argv(d, "--out-path", tmp_path / "s.out", "--calibration", cal)), "--calibration")
    done = run("eval.py", *eval_argv(d, "--out-path", tmp_path / "s.out", "--calibration", cal, "--allow-other-model"))
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- C/D: cohorts and embedding files


def write_cohort(path, vectors, provenance=None):
    with h5py.File(path, "w") as h5:
        h5.attrs["embedding_size"] = SMALL_ECAPA["embedding_size"]
        if provenance is not None:
            h5.attrs["provenance"] = json.dumps(provenance)
        for k, vec in enumerate(vectors):
            h5.create_dataset(f"c{k}", data=np.asarray(vec, dtype=np.float32))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("identical", "no spread"),
        ("zero", "no spread"),
        ("nan", "NaN or Inf"),
        ("empty", "holds no embeddings"),
        ("other-size", "size 4"),
    ],
)
def test_items6_27_bad_cohorts_are_one_line_and_write_nothing(d, tmp_path, kind, message):
    """A cohort of identical, zero or non-finite vectors (item 6) gave a traceback after a score file full of
    NaN was written; an empty one (item 27) said "other shapes"."""
    size = SMALL_ECAPA["embedding_size"]
    vectors = {
        "identical": [np.ones(size)] * 3,
        "zero": [np.zeros(size)] * 3,
        "nan": [np.ones(size), np.full(size, np.nan), np.arange(size)],
        "empty": [],
        "other-size": [np.ones(4)] * 3,
    }[kind]
    cohort = tmp_path / "cohort.h5"
    write_cohort(cohort, vectors, load_model(d["cp"]).provenance)  # made by --cp-path: no provenance warning
    out = tmp_path / "out"
    out.mkdir()
    refused(run("eval.py", *eval_argv(d, "--out-path", out / "s.out", "--cohort", cohort)), message)
    assert os.listdir(out) == []


def test_item6_non_finite_scores_never_reach_a_score_file(tmp_path):
    """The class behind item 6: whatever scorer gives NaN or Inf, the write stops and leaves no file."""
    from e2e_verification import scoring

    enroll, test, target = ["a", "b"], ["c", "d"], np.array([True, False])
    with pytest.raises(utils.UserError, match="snorm_cos scores hold NaN or Inf"):
        scoring.write_score_file(str(tmp_path / "s.out"), enroll, test, {"snorm_cos": np.array([0.5, np.nan])}, target)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", ["readme", "binary"])
def test_item29_train_plda_names_a_file_that_is_not_embeddings(tmp_path, content):
    path = tmp_path / "README.md"
    if content == "readme":
        path.write_text("# A title\n\nSome words about the project, several per line.\n")
    else:
        path.write_bytes(bytes(range(256)))
    refused(run("train_plda.py", "--embeddings", path, "--out", tmp_path / "p.json"), "is neither an embeddings.h5")
    assert not (tmp_path / "p.json").exists()


def test_guard_output_folder_force_needs_the_tools_marker(tmp_path):
    """check_output_folder: --force replaces only the same tool's earlier output (its marker), never a user's
    folder or another tool's output; an input inside the folder is refused even with --force."""
    mine, user, theirs = (tmp_path / name for name in ("mine", "user", "theirs"))
    for folder in (mine, user, theirs):
        folder.mkdir()
        (folder / "file").write_text("precious")
    utils.mark_output_folder(str(mine), "font_set")
    utils.mark_output_folder(str(theirs), "asterisk_set")
    assert utils.check_output_folder("--out", str(mine), "font_set", force=True) == str(mine)
    for folder, force, message in (
        (mine, False, "not empty"),
        (user, True, "left alone"),
        (theirs, True, "left alone"),
    ):
        with pytest.raises(utils.UserError, match=message):
            utils.check_output_folder("--out", str(folder), "font_set", force=force)
    with pytest.raises(utils.UserError, match="holds --fonts"):
        utils.check_output_folder("--out", str(mine), "font_set", True, {"--fonts": str(mine / "file")})
    assert (user / "file").read_text() == "precious"


def test_guard_refuses_outputs_that_are_inputs_through_symlinks(tmp_path):
    (tmp_path / "data").write_text("x")
    os.symlink(tmp_path / "data", tmp_path / "alias")
    with pytest.raises(utils.UserError, match="would overwrite"):
        utils.check_outputs({"--out": str(tmp_path / "alias")}, {"--in": str(tmp_path / "data")})
    utils.check_outputs({"--out": str(tmp_path / "new")}, {"--in": str(tmp_path / "data")})


def test_image_cohort_folder_still_embeds(tmp_path):
    """An image eval with a cohort folder (not an embeddings file) still works through the same check path."""
    data = make_image_tree(str(tmp_path / "test"), n_classes=2, per_class=4)
    cohort = make_image_tree(str(tmp_path / "cohort"), n_classes=2, per_class=3, seed=3)
    cp = write_checkpoint(str(tmp_path / "cp.pt"))
    out = tmp_path / "s.out"
    done = run("eval.py", "--data-path", data, "--cp-path", cp, "--out-path", out, "--cohort", cohort, *CPU)
    assert done.returncode == 0 and out.exists(), done.stderr


def test_train_hp_out_file_never_replaces_its_training_data(tmp_path):
    """train_hp.py --out-file naming its --train-hdf-file (an instance of the class nobody listed): refused
    before training, the data intact."""
    data = tmp_path / "train.hdf"
    data.write_bytes(b"precious")
    done = run("train_hp.py", "--train-hdf-file", data, "--out-file", data, "--checkpoint-path", tmp_path / "cp")
    refused(done, "--out-file would overwrite", "an input of this run")
    assert data.read_bytes() == b"precious" and not (tmp_path / "cp").exists()


def test_one_check_compares_an_artifacts_model_with_its_reference(capsys):
    """checkpoints.check_same_weights, behind check_provenance (an artifact against the loaded model) and
    train_distance.py's held-out embeddings (against the training embeddings' model)."""
    from e2e_verification.checkpoints import check_same_weights

    ours, theirs = {"checkpoint": "a.pt", "weights_sha256": "aa"}, {"checkpoint": "b.pt", "weights_sha256": "bb"}
    check_same_weights(ours, dict(ours), "the file", "this model")
    assert capsys.readouterr().err == ""
    with pytest.raises(utils.UserError, match=r"^the file was made with b.pt \(weights bb\), not with this model "):
        check_same_weights(theirs, ours, "the file", "this model")
    with pytest.raises(utils.UserError, match=r"\(weights aa\)$"):  # no flag to name: nothing more said
        check_same_weights(theirs, ours, "the file", "this model", override=None)
    check_same_weights(theirs, ours, "the file", "this model", allow=True)
    assert capsys.readouterr().err.endswith("; used anyway (--allow-other-model)\n")
    check_same_weights(None, ours, "the file", "this model")
    assert "the file does not record which model made it" in capsys.readouterr().err
    check_same_weights(theirs, {}, "the file", "the model of --embeddings")
    assert "the model of --embeddings is not recorded, so the file is not checked" in capsys.readouterr().err
