"""Reliability of calibrate.py and calibration.py's score-file readers: outputs that would destroy an input or
cannot be written (refused before any work), the .npz score files eval.py writes, memory bounded per trial
(numpy columns, no per-trial Python objects, a chunked fit and streaming metrics), and the provenance a
score file records, carried into the calibration JSON.

Score files are written with scoring's own writers; the provenance line and member by hand, in the format
of utils/checkpoints' notes (`# provenance {json}` first line; `provenance.npy`, a 0-d str of JSON).
"""

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from tiny_data import make_image_tree, unwritable_folder, write_checkpoint

import calibrate
from e2e_verification import calibration, scoring
from utils import UserError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVENANCE = {"checkpoint": "/runs/a/cp.pt", "weights_sha256": "0123456789abcdef", "model": "densenet"}


def score_table(n, seed=0):
    """A scoring.PairTable of n trials like eval.py's (1 target in 5; e2e logits and cosines that separate)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    sign = np.where(labels, 1.0, -1.0)
    logit = (2.0 * rng.normal(size=n) + 2.5 * sign).astype(np.float32)
    cos = (0.2 * rng.normal(size=n) + 0.3 * sign + 0.2).astype(np.float32)
    prob = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    idx = (rng.integers(0, 500, n), rng.integers(0, 500, n))
    return scoring.PairTable(prob, logit, cos, labels, ids=[f"item{i}" for i in range(500)], idx=idx)


def write_text(path, n=400, seed=0, provenance=None):
    """A text score file of scoring.write_score_file, with a `# provenance` first line when given."""
    table = score_table(n, seed)
    columns = {s.name: table.column(scoring.SCORERS, s.name) for s in scoring.SCORERS}
    scoring.write_score_file(str(path), *table.names(0, n), columns, table.target)
    if provenance is not None:
        body = open(path).read()
        open(path, "w").write("# provenance " + json.dumps(provenance) + "\n" + body)
    return str(path)


def write_npz(path, n=400, seed=0, provenance=None):
    """A score .npz of scoring.write_table_npz, with a provenance.npy member when given."""
    scoring.write_table_npz(str(path), score_table(n, seed), scoring.SCORERS)
    if provenance is not None:
        with zipfile.ZipFile(path, "a") as archive, archive.open("provenance.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(json.dumps(provenance)))
    return str(path)


def refused(argv, capsys):
    """calibrate.py's one-line error (exit 2) for `argv`."""
    with pytest.raises(SystemExit) as exit_info:
        cli(calibrate.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def listing(folder):
    """{name: bytes or None for a folder} of a folder's entries, links followed."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        found[name] = None if os.path.isdir(path) else open(path, "rb").read()
    return found


# ----------------------------------------------------------------------------- outputs (items 2, 17, 18)


def test_item2_out_naming_the_scores_is_refused_and_the_scores_kept(tmp_path):
    scores = write_text(tmp_path / "dev.out")
    before = listing(tmp_path)
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "calibrate.py"), "--scores", scores, "--out", scores],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert "--out" in run.stderr and "overwrite" in run.stderr and "--scores" in run.stderr
    assert listing(tmp_path) == before


def test_item2_out_linked_to_the_scores_is_refused(tmp_path, capsys):
    scores = write_text(tmp_path / "dev.out")
    os.symlink(scores, tmp_path / "soft.json")
    os.link(scores, tmp_path / "hard.json")
    before = listing(tmp_path)
    for out in ("soft.json", "hard.json", "./dev.out"):
        argv = ["--scores", scores, "--out", os.path.join(str(tmp_path), out)]
        err = refused(argv, capsys)
        assert "overwrite" in err and "--scores" in err
    assert listing(tmp_path) == before


def test_item17_out_that_is_a_folder_or_in_no_folder_is_one_line(tmp_path, capsys):
    scores = write_text(tmp_path / "dev.out")
    (tmp_path / "cal.json").mkdir()
    before = listing(tmp_path)
    assert "is a folder" in refused(["--scores", scores, "--out", str(tmp_path / "cal.json")], capsys)
    assert "is a folder" in refused(["--scores", scores, "--out", str(tmp_path)], capsys)
    assert "does not exist" in refused(["--scores", scores, "--out", str(tmp_path / "no" / "cal.json")], capsys)
    assert "is a file" in refused(["--scores", scores, "--out", str(tmp_path / "dev.out" / "cal.json")], capsys)
    assert listing(tmp_path) == before


def test_item18_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    scores = write_text(tmp_path / "dev.out")
    folder = unwritable_folder(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the score file was read before the output was checked")

    monkeypatch.setattr(calibrate, "read_scores", no_work, raising=False)
    monkeypatch.setattr(calibrate, "read_score_file", no_work, raising=False)
    err = refused(["--scores", scores, "--out", os.path.join(folder, "cal.json")], capsys)
    assert "cannot write in" in err and folder in err


# ----------------------------------------------------------------------------- .npz score files (item 26)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_calibrate")
    data = make_image_tree(str(root / "test"), n_classes=3, per_class=7)
    return data, write_checkpoint(str(root / "cp.pt"))


def test_item26_calibrate_reads_the_npz_eval_writes(images, tmp_path, capsys):
    import eval as eval_script

    data, cp = images
    params = {}
    for kind, name in (("text", "s.out"), ("npy", "s.npz")):
        scores = str(tmp_path / name)
        argv = ["--data-path", data, "--cp-path", cp, "--out-path", scores, "--score-format", kind, "--device", "cpu"]
        assert eval_script.main(argv) == 0
        assert calibrate.main(["--scores", scores, "--out", str(tmp_path / f"{kind}.json")]) == 0
        params[kind] = json.load(open(tmp_path / f"{kind}.json"))
    capsys.readouterr()
    # the npz's float32 columns, fitted as they are
    columns, labels, _, _ = scoring.read_table_npz(str(tmp_path / "s.npz"))
    want = calibration.fit_calibration(columns, labels, 0.01, [["e2e_logit", "cos"]], ["e2e_logit", "cos"])
    for got in (params["npy"], params["text"]):  # the text file's 6 and 7 digits move the fit a little
        tolerance = 1e-9 if got is params["npy"] else 1e-3
        for name, cal in want["calibrations"].items():
            assert got["calibrations"][name] == pytest.approx(cal, rel=tolerance, abs=tolerance)
        fusion = got["fusions"]["e2e_logit+cos"]
        assert fusion["weights"] == pytest.approx(want["fusions"]["e2e_logit+cos"]["weights"], rel=tolerance)
        assert fusion["bias"] == pytest.approx(want["fusions"]["e2e_logit+cos"]["bias"], rel=tolerance, abs=tolerance)
    assert params["npy"]["dev_metrics"].keys() == params["text"]["dev_metrics"].keys()


def test_item26_the_kind_of_score_file_is_read_from_its_content(tmp_path, capsys):
    npz, text = write_npz(tmp_path / "a.npz"), write_text(tmp_path / "b.out")
    shutil.copy(npz, tmp_path / "a.out")  # an npz under a text file's name, and the other way round
    shutil.copy(text, tmp_path / "b.npz")
    got = {}
    for name in ("a.npz", "a.out", "b.out", "b.npz"):
        assert calibrate.main(["--scores", str(tmp_path / name), "--out", str(tmp_path / "cal.json")]) == 0
        saved = json.load(open(tmp_path / "cal.json"))
        got[name] = {k: saved[k] for k in ("calibrations", "fusions")}
    capsys.readouterr()
    assert got["a.npz"] == got["a.out"] and got["b.out"] == got["b.npz"]
    # read_score_file reads the npz as scoring.read_table_npz does, the names as lists
    columns, labels, enroll, test = calibration.read_score_file(npz)
    want_columns, want_labels, want_enroll, want_test = scoring.read_table_npz(npz)
    assert list(columns) == list(want_columns) == ["e2e", "cos", "fus", "e2e_logit"]
    for name, values in want_columns.items():
        np.testing.assert_array_equal(columns[name], values)
    np.testing.assert_array_equal(labels, want_labels)
    assert enroll == want_enroll.tolist() and test == want_test.tolist()


def test_item26_a_compressed_npz_and_a_text_file_with_a_byte_order_mark_read_alike(tmp_path):
    npz = write_npz(tmp_path / "s.npz", provenance=PROVENANCE)
    with np.load(npz) as data:
        np.savez_compressed(tmp_path / "packed", **{name: data[name] for name in data.files})
    want, packed = (
        calibration.read_scores(npz, ids=True),
        calibration.read_scores(str(tmp_path / "packed.npz"), ids=True),
    )
    assert packed.provenance == want.provenance == PROVENANCE and packed.enroll == want.enroll
    for name, values in want.columns.items():
        np.testing.assert_array_equal(packed.columns[name], values)
    text = write_text(tmp_path / "s.out", provenance=PROVENANCE)
    marked = tmp_path / "marked.out"
    marked.write_text("\ufeff" + open(text).read(), encoding="utf-8")
    assert calibration.read_scores(str(marked)).provenance == PROVENANCE
    np.testing.assert_array_equal(calibration.read_scores(str(marked)).labels, calibration.read_scores(text).labels)


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncated", "not a readable .npz score file"),
        ("no_label", "needs a label.npy member"),
        ("short_column", "cos.npy must be a \\(400,\\) float array"),
        ("nan", "cos.npy holds a non-finite score"),
        ("binary", "not a score file"),
    ],
)
def test_item26_a_broken_npz_is_one_line(tmp_path, damage, match):
    path = write_npz(tmp_path / "s.npz")
    if damage == "truncated":
        whole = open(path, "rb").read()
        open(path, "wb").write(whole[: len(whole) // 2])
    if damage in ("no_label", "short_column", "nan"):
        members = {}
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    members[info.filename] = np.lib.format.read_array(member)
        if damage == "no_label":
            del members["label.npy"]
        if damage == "short_column":
            members["cos.npy"] = members["cos.npy"][:-1]
        if damage == "nan":
            members["cos.npy"][7] = np.nan
        np.savez(path[: -len(".npz")], **{k[: -len(".npy")]: v for k, v in members.items()})
    if damage == "binary":
        open(path, "wb").write(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=match) as err:
        calibration.read_score_file(path)
    assert "\n" not in str(err.value) and path in str(err.value)


# ----------------------------------------------------------------------------- memory (item 34)


def test_item34_calibrate_holds_no_python_object_per_trial(tmp_path, capsys):
    """Today's Python-tracked peak: columns of float32, a bool label and fixed-size chunks. The line-by-line
    reader kept ids, labels and every score as Python objects: ~340 bytes a trial traced here (100 MB)."""
    n = 300_000
    scores = write_text(tmp_path / "dev.out", n=n)
    tracemalloc.start()
    try:
        assert calibrate.main(["--scores", scores, "--out", str(tmp_path / "cal.json")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    capsys.readouterr()
    assert peak < 50e6, f"peak {peak / 1e6:.1f} MB for {n} trials"


def test_item34_npz_columns_are_memory_mapped_and_only_the_asked_ones_read(tmp_path):
    path = write_npz(tmp_path / "s.npz")
    got = calibration.read_scores(path, ["cos", "e2e_logit"], dtype=np.float32)
    assert list(got.columns) == ["cos", "e2e_logit"] and got.enroll is None and got.test is None
    assert all(isinstance(values, np.memmap) for values in got.columns.values())
    assert isinstance(got.labels, np.memmap) and got.labels.dtype == bool
    columns, labels, _, _ = scoring.read_table_npz(path)
    np.testing.assert_array_equal(got.columns["cos"], columns["cos"])
    np.testing.assert_array_equal(got.labels, labels)


def test_item34_the_chunked_fit_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.1
    sign = np.where(labels, 1.0, -1.0)
    columns = {"x": rng.normal(size=5000) + sign, "y": (0.3 * rng.normal(size=5000) + 0.5 * sign).astype(np.float32)}
    whole = calibration.fit_calibration(columns, labels, 0.05, fusions=[["x", "y"]])
    monkeypatch.setattr(calibration, "FIT_CHUNK", 777)
    chunked = calibration.fit_calibration(columns, labels, 0.05, fusions=[["x", "y"]])
    for name in ("x", "y"):
        assert chunked["calibrations"][name] == pytest.approx(whole["calibrations"][name], rel=1e-9, abs=1e-12)
    assert chunked["fusions"]["x+y"]["weights"] == pytest.approx(whole["fusions"]["x+y"]["weights"], rel=1e-9)
    assert chunked["fusions"]["x+y"]["bias"] == pytest.approx(whole["fusions"]["x+y"]["bias"], rel=1e-9)
    # the 2-D form of train_linear_llr fits the same columns
    w, b = calibration.train_linear_llr(np.stack([columns["x"], columns["y"]], 1), labels, 0.05)
    assert dict(zip("xy", w)) == pytest.approx(whole["fusions"]["x+y"]["weights"], rel=1e-9)


def test_item34_text_chunks_keep_values_and_line_numbers(tmp_path, monkeypatch):
    path = write_text(tmp_path / "dev.out", n=3000, provenance=PROVENANCE)
    whole = calibration.read_scores(path, ids=True)
    monkeypatch.setattr(calibration, "TEXT_CHUNK", 333)
    for ids in (False, True):
        got = calibration.read_scores(path, ids=ids)
        assert list(got.columns) == list(whole.columns)
        for name, values in whole.columns.items():
            np.testing.assert_array_equal(got.columns[name], values)
        np.testing.assert_array_equal(got.labels, whole.labels)
        assert (got.enroll, got.test) == ((whole.enroll, whole.test) if ids else (None, None))
    lines = open(path).read().splitlines(keepends=True)
    lines[2500] = lines[2500].replace("target", "tarjet")  # line 2501: provenance, header, trial 2499
    open(path, "w").write("".join(lines))
    with pytest.raises(UserError, match=f"^{path}:2501: the label must be target or nontarget"):
        calibration.read_scores(path)


ODD = ["1_0", "nan", "-inf", "1e400", "\u0663", "0x1", "", "1 2", "+.5", "5.", "1e-400", "\u00a0", "\t", "x"]
ODD_LABELS = ["nontargetx", "Target", "target\x0b", "nontarget extra", "tar"]


def test_item34_the_fast_parser_agrees_with_the_line_by_line_one(tmp_path):
    """Random damage to a score file: numpy's parser (no names asked) and the line-by-line one (names asked)
    read the same trials, or raise the same one-line error."""
    rng = np.random.default_rng(7)
    clean = open(write_text(tmp_path / "clean.out", n=60)).read().splitlines(keepends=True)
    for case in range(150):
        lines = list(clean)
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(1, len(lines)))
            fields = lines[k].rstrip("\n").split(" ")
            where = int(rng.integers(0, len(fields)))
            if where == len(fields) - 1:
                fields[where] = str(rng.choice(ODD_LABELS))
            else:
                fields[where] = str(rng.choice(ODD))
            lines[k] = " ".join(fields) + "\n"
        path = tmp_path / "damaged.out"
        path.write_text("".join(lines))
        outcomes = []
        for ids in (False, True):
            try:
                got = calibration.read_scores(str(path), ids=ids, dtype=np.float32)
                outcomes.append(({k: v.tolist() for k, v in got.columns.items()}, got.labels.tolist()))
            except UserError as err:
                outcomes.append(str(err))
        assert outcomes[0] == outcomes[1], (case, "".join(lines))


# ----------------------------------------------------------------------------- provenance (item 8)


@pytest.mark.parametrize("kind", ["text", "npz"])
def test_item8_the_provenance_of_the_scores_goes_into_the_calibration(tmp_path, capsys, kind):
    write = write_text if kind == "text" else write_npz
    scores = write(tmp_path / f"dev.{kind}", provenance=PROVENANCE)
    out = str(tmp_path / "cal.json")
    assert calibrate.main(["--scores", scores, "--out", out]) == 0
    assert json.load(open(out))["provenance"] == PROVENANCE
    assert calibration.load_calibration(out)["provenance"] == PROVENANCE
    assert calibration.read_scores(scores).provenance == PROVENANCE
    assert calibration.score_file_names(scores) == (["e2e", "cos", "fus", "e2e_logit"], PROVENANCE)
    # a file that records none: null in the JSON, no provenance in the parameters
    plain = write(tmp_path / f"plain.{kind}")
    assert calibration.read_scores(plain).provenance is None
    assert calibrate.main(["--scores", plain, "--out", out]) == 0
    capsys.readouterr()
    assert json.load(open(out))["provenance"] is None
    assert "provenance" not in calibration.load_calibration(out)


@pytest.mark.parametrize(
    "first,match",
    [
        ("# provenance {not json\n", ":1: the provenance is not valid JSON"),
        ("# provenance [1, 2]\n", ":1: the provenance must be a JSON object"),
        ("# provenance {}\n# enroll e2e label\n", ":2: a header must read"),
    ],
)
def test_item8_a_bad_provenance_line_is_one_line(tmp_path, first, match):
    path = tmp_path / "dev.out"
    path.write_text(first + "a b 0.9 0.5 0.7 target\nc d 0.1 -0.25 -0.1 nontarget\n")
    with pytest.raises(UserError, match=match) as err:
        calibration.read_score_file(str(path))
    assert "\n" not in str(err.value)


def test_item8_load_calibration_checks_the_provenance(tmp_path):
    good = {"p_target": 0.01, "calibrations": {"cos": {"a": 2.0, "b": -1.0}}, "fusions": {}}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({**good, "provenance": "cp.pt"}))
    with pytest.raises(UserError, match="provenance must be an object"):
        calibration.load_calibration(str(path))
    path.write_text(json.dumps({**good, "provenance": PROVENANCE}))
    assert calibration.load_calibration(str(path)) == {**good, "provenance": PROVENANCE}
    path.write_text(json.dumps(good))
    assert calibration.load_calibration(str(path)) == good
