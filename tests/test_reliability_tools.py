"""Reliability of the dataset tools (tools/font_set.py, tools/asterisk_set.py) and the benches' command lines:
a user's folder is never replaced, outputs appear whole or not at all, bad flag values are refused in one
line that names the flag, and signals end a run without tracebacks from worker processes."""

import glob
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tiny_data import unwritable_folder

from utils import OUTPUT_MARKER, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
EXPERIMENTS = os.path.join(ROOT, "experiments")
SOUNDS = "/usr/share/asterisk/sounds"
# Five families of tests/test_font_set.py's fonts: enough for a split with 2 test families.
FONTS = [
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSerif-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationMono-Regular.ttf",
    "/usr/share/fonts/truetype/hack/Hack-Regular.ttf",
    "/usr/share/fonts/truetype/comfortaa/Comfortaa-Regular.ttf",
    "/usr/share/fonts/opentype/cantarell/Cantarell-Regular.otf",
]
fonts = pytest.mark.skipif(
    not all(os.path.isfile(p) for p in FONTS), reason="Debian font packages not installed (scripts/install.sh --test)"
)
asterisk = pytest.mark.skipif(
    not os.path.isdir(SOUNDS) or shutil.which("sox") is None, reason="Asterisk prompt packages or sox not installed"
)


def run_script(script, argv, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)  # fmt: skip


def refused(script, argv, expected, timeout=300):
    """Run `script`: it exits 2 with one line on stderr, `<script>: error: ...expected...`, and no traceback."""
    done = run_script(script, argv, timeout)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, f"exit {done.returncode}; stderr: {done.stderr[-1500:]}"
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-1500:]
    assert lines[0].startswith(f"{os.path.basename(script)}: error: ") and expected in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """{relative path: bytes} of every file under `folder` (and the folder names), to compare before and after."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        rel = os.path.relpath(path, folder)
        found[rel] = open(path, "rb").read() if os.path.isfile(path) else None
    return found


def hidden_leftovers(parent):
    """Temporary folders a build left beside its output (they start with a dot)."""
    return [name for name in os.listdir(parent) if name.startswith(".")]


@pytest.fixture
def fonts_dir(tmp_path):
    folder = tmp_path / "fonts"
    folder.mkdir()
    for path in FONTS:
        os.symlink(path, folder / os.path.basename(path))
    return str(folder)


def font_argv(out, fonts_dir, *flags):
    return ["--out", str(out), "--packages", "--fonts-dir", fonts_dir, "--test-families", "2", "--jobs", "1", *flags]


@pytest.fixture
def precious(tmp_path):
    """A user's own folder: a note and a sub-folder of data, no tool's marker."""
    folder = tmp_path / "precious"
    (folder / "mine").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "mine" / "data.csv").write_text("1,2,3\n")
    return folder


# ----------------------------------------------------------------------------- 5: --force and atomic builds


@fonts
def test_item5_font_set_force_leaves_a_users_folder_alone(precious, fonts_dir):
    before = snapshot(precious)
    refused("tools/font_set.py", font_argv(precious, fonts_dir, "--force"), "is not one, so it is left alone")
    assert snapshot(precious) == before


@fonts
def test_item5_font_set_marks_its_output_and_force_replaces_only_that(tmp_path, fonts_dir, capsys):
    from tools import font_set

    out = tmp_path / "set"
    assert font_set.main(font_argv(out, fonts_dir)) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["tool"] == "font_set"
    (out / "stale.txt").write_text("from an earlier run\n")
    assert font_set.main(font_argv(out, fonts_dir, "--force", "--seed", "3")) == 0
    assert not (out / "stale.txt").exists() and (out / OUTPUT_MARKER).is_file()
    assert hidden_leftovers(tmp_path) == []


@asterisk
def test_item5_asterisk_set_builds_whole_and_its_lists_point_at_the_final_folder(tmp_path, capsys):
    from tools import asterisk_set

    out = tmp_path / "data" / "ast"  # the missing parent is made, as for `--out data/asterisk` in a fresh checkout
    assert asterisk_set.main(["--out", str(out), "--max-per-speaker", "3", "--seed", "1", "--no-floor"]) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["tool"] == "asterisk_set"
    listed = [line.split(maxsplit=1)[1] for line in (out / "all" / "wav.scp").read_text().splitlines()]
    assert listed and all(path.startswith(str(out) + os.sep) and os.path.isfile(path) for path in listed)
    on_disk = glob.glob(str(out / "wav" / "*" / "*.wav"))
    assert sorted(on_disk) == sorted(listed)
    assert hidden_leftovers(out.parent) == []


@asterisk
def test_item5_asterisk_set_killed_run_leaves_nothing_and_a_rerun_lists_every_wav(tmp_path):
    """A run killed while it writes wavs leaves no partial folder (the old one held 327 wavs for 6 listed)."""
    out = tmp_path / "ast"
    cmd = [sys.executable, os.path.join(ROOT, "tools/asterisk_set.py"), "--out", str(out), "--no-floor", "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(glob.glob(str(tmp_path / "*" / "wav" / "*" / "*.wav"), include_hidden=True)) < 20:
            assert proc.poll() is None, f"asterisk_set ended before writing wavs: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no wav files appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert code == 143 and "Traceback" not in stderr, stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    done = run_script("tools/asterisk_set.py", ["--out", str(out), "--max-per-speaker", "2", "--no-floor"])
    assert done.returncode == 0, done.stderr
    listed = (out / "all" / "wav.scp").read_text().splitlines()
    assert len(glob.glob(str(out / "wav" / "*" / "*.wav"))) == len(listed) == 14


# ----------------------------------------------------------------------------- 32: asterisk_set's --out and flags


@asterisk
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_item32_asterisk_set_refuses_a_users_non_empty_folder(precious, force):
    before = snapshot(precious)
    expected = "is not one, so it is left alone" if force else "exists and is not empty"
    refused("tools/asterisk_set.py", ["--out", str(precious), "--max-per-speaker", "2", "--no-floor", *force], expected)
    assert snapshot(precious) == before


@asterisk
def test_item32_asterisk_set_refuses_its_own_earlier_output_without_force(tmp_path, capsys):
    from tools import asterisk_set

    out = tmp_path / "ast"
    assert asterisk_set.main(["--out", str(out), "--max-per-speaker", "2", "--no-floor"]) == 0
    with pytest.raises(UserError, match="exists and is not empty .*--force"):
        asterisk_set.main(["--out", str(out), "--max-per-speaker", "3", "--no-floor"])
    assert asterisk_set.main(["--out", str(out), "--max-per-speaker", "3", "--no-floor", "--force"]) == 0
    assert len((out / "all" / "wav.scp").read_text().splitlines()) == 21


@asterisk
@pytest.mark.parametrize("value", ["-1", "-5", "1"])
def test_item32_max_per_speaker_below_2_is_refused_not_read_as_all(tmp_path, value):
    out = tmp_path / "ast"
    refused("tools/asterisk_set.py", ["--out", str(out), "--max-per-speaker", value, "--no-floor"],
            f"--max-per-speaker must be 0 (all) or at least 2, got {value}", timeout=120)  # fmt: skip
    assert not out.exists()


# ----------------------------------------------------------------------------- 19, 18: --out under a file, read-only


@fonts
def test_item19_font_set_out_under_a_file_is_one_line(tmp_path, fonts_dir):
    (tmp_path / "afile").write_text("x")
    refused("tools/font_set.py", font_argv(tmp_path / "afile" / "sub", fonts_dir), "which is a file")
    assert sorted(os.listdir(tmp_path)) == ["afile", "fonts"]


@asterisk
@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_item19_asterisk_set_out_on_or_under_a_file_is_one_line(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    refused("tools/asterisk_set.py", ["--out", str(tmp_path / where), "--max-per-speaker", "2", "--no-floor"], "file")
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "x"


@asterisk
def test_item18_asterisk_set_read_only_parent_is_one_line(tmp_path):
    parent = unwritable_folder(tmp_path)
    refused("tools/asterisk_set.py", ["--out", os.path.join(parent, "ast"), "--max-per-speaker", "2"], "cannot write")


# ----------------------------------------------------------------------------- 21: signals and worker processes


@pytest.mark.parametrize(
    "send, sig, code, last",
    [
        (os.killpg, signal.SIGTERM, 143, "terminated"),
        (os.killpg, signal.SIGINT, 130, "interrupted"),
        (os.kill, signal.SIGTERM, 143, "terminated"),
    ],
    ids=["group-SIGTERM", "group-SIGINT", "parent-SIGTERM"],
)
def test_item21_font_set_signal_ends_quietly(tmp_path, send, sig, code, last):
    """`timeout` and Ctrl-C signal the whole process group, `kill` the parent: the rendering processes must not
    print the parent's Terminated / KeyboardInterrupt tracebacks nor hang the pool's shutdown, and no temporary
    folder stays behind."""
    if shutil.which("dpkg") is None or not os.path.isdir("/usr/share/fonts/truetype/noto"):
        pytest.skip("the Debian font packages are not installed")
    out = tmp_path / "fonts"
    cmd = [sys.executable, os.path.join(ROOT, "tools/font_set.py"), "--out", str(out), "--jobs", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("packages:")  # printed just before the pool starts
        time.sleep(2.0)
        assert proc.poll() is None, "font_set ended before the signal"
        send(proc.pid, sig)
        assert proc.wait(timeout=60) == code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1:] == [last], stderr[-3000:]
    assert os.listdir(tmp_path) == []


def test_item21_font_set_broken_font_file_is_dropped_not_a_traceback(tmp_path):
    """A rendering process's error on a broken file comes back as a dropped font (any kind of error, not only
    OSError and ValueError), never as a traceback re-raised from the pool."""
    from tools import font_set

    bad = tmp_path / "broken.ttf"
    bad.write_bytes(b"\x00\x01\x00\x00" + b"\xff" * 300)  # a TrueType header and garbage
    record = font_set.examine((str(bad), 16))
    assert record["glyphs"] == [] and record["error"]


# ----------------------------------------------------------------------------- 22, 31: the benches' flags


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script or an accuracy study by name, with bench/ and experiments/ on sys.path."""
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.syspath_prepend(EXPERIMENTS)
    return lambda name: importlib.import_module(name)


BENCH_CASES = [
    # item 22: tracebacks (ValueError, RuntimeError) after parsing
    ("metric_speed", ["--n", "0"], "argument --n: must be >= 10, got 0"),
    ("metric_speed", ["--n", "1"], "argument --n: must be >= 10, got 1"),
    ("metric_speed", ["--n", "-5"], "argument --n: must be >= 10, got -5"),
    ("allpairs", ["--n", "1"], "argument --n: must be >= 2, got 1"),
    ("export_speed", ["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    # item 31: messages that did not name the flag, reversed ranges, 0 silently replaced by a default
    ("accuracy", ["--seeds", "a,b"], "argument --seeds: expected integers like 1,2,3 or 1-3, got 'a,b'"),
    ("accuracy", ["--folds", "9-3"], "argument --folds: range 9-3 runs backwards"),
    ("allpairs", ["--n", "0"], "argument --n: must be >= 2, got 0"),
    ("score_norm_speed", ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    # the same class elsewhere
    ("accuracy", ["--folds", "7"], "argument --folds: 7 is outside 0..6"),
    ("accuracy", ["--variants", "concat,concat"], "argument --variants: variant concat is given twice"),
    ("accuracy", ["--protocols", "nope"], "argument --protocols: unknown protocol 'nope'"),
    ("accuracy", ["--speech-flags", "'--model"], "argument --speech-flags: No closing quotation"),
    ("learning_speed", ["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    ("learning_speed", ["--seeds", "3-1"], "argument --seeds: range 3-1 runs backwards"),
    ("learning_speed", ["--early-epoch", "0"], "argument --early-epoch: must be >= 1, got 0"),
    ("class_count", ["--sizes", "8,1,all"], "argument --sizes: must be >= 2, got 1"),
    ("class_count", ["--batch-size", "4"], "argument --batch-size: must be >= 10, got 4"),
    ("speech_backends", ["--runs", "r", "--folds", "2-x"], "argument --folds: expected integers"),
    ("speech_backends", ["--runs", "r", "--lda-dim", "-1"], "argument --lda-dim: must be >= 0, got -1"),
    ("image_calibration", ["--runs", "r", "--p-targets", "0.01,1"], "argument --p-targets: a prior must lie"),
    ("image_calibration", ["--runs", "r", "--out", "/nonexistent/t.md"], "--out: output folder does not exist"),
    ("prep_throughput", ["--frames", "1"], "argument --frames: must be >= 2, got 1"),
    ("train_throughput", ["--precisions", "fp16"], "argument --precisions: unknown precision 'fp16'"),
    ("train_throughput", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("allpairs_eval", ["--n", "1"], "argument --n: must be >= 2, got 1"),
    ("export_speed", ["--opset", "0"], "argument --opset: must be >= 14, got 0"),
    ("export_speed", ["--frames", "2"], "argument --frames: must be >= 8, got 2"),
]


@pytest.mark.parametrize("name, argv, expected", BENCH_CASES, ids=[f"{c[0]}{''.join(c[1])}" for c in BENCH_CASES])
def test_item22_item31_bench_flags_are_checked_while_parsing(bench, name, argv, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        bench(name).build_parser().parse_args(argv)


def bench_names():
    scripts = glob.glob(os.path.join(BENCH, "*.py")) + glob.glob(os.path.join(EXPERIMENTS, "*.py"))
    return sorted(os.path.basename(p)[:-3] for p in scripts if "benchlib" not in p)


@pytest.mark.parametrize("name", bench_names())
def test_item22_item31_every_checked_flag_of_every_bench_refuses_nonsense(bench, name):
    """Every flag that takes a number or a list refuses a non-number, nan, a negative number and a reversed range
    while parsing, naming the flag (a plain `int` type let -1, 0 and 9-3 through to tracebacks or defaults)."""
    module = bench(name)
    parser = module.build_parser()
    required = [arg for a in parser._actions if a.required for arg in (a.option_strings[0], "r")]
    free_text = (str, None, getattr(module, "shell_words", None), bench("benchlib").table_path)
    for action in parser._actions:
        if action.type in free_text or not action.option_strings or action.option_strings[0] in required:
            continue
        flag = action.option_strings[0]
        for bad in ("x", "nan", "-1", "3-1"):
            with pytest.raises(UserError, match=f"argument {flag}"):
                parser.parse_args([*required, flag, bad])


def test_item31_calibration_study_run_directly_is_refused(bench):
    refused("experiments/calibration_study.py", ["--bogus-flag"], "unrecognized arguments: --bogus-flag")
    refused("experiments/calibration_study.py", [], "library of the calibration benches, not a command")


def test_item22_bench_bad_flag_is_one_line_from_the_command(tmp_path):
    refused("bench/metric_speed.py", ["--device", "cpu", "--n", "0"], "argument --n: must be >= 10, got 0")
    refused("bench/export_speed.py", ["--threads", "-1"], "argument --threads: must be >= 1, got -1")
