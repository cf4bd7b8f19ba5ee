"""The user's view of every script: --help ends with an example command line of that script."""

import glob
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts():
    """Every command-line script of the project (top level, tools/, bench/, experiments/): files with a __main__
    block."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))):
        rel = os.path.relpath(path, ROOT)
        if rel.split(os.sep)[0] in ("tests", ".venv") or "__main__" not in open(path).read():
            continue
        found.append(rel)
    return found


def help_text(rel):
    """The --help text of a script, from its build_parser() (some return (parser, their own flags))."""
    folder = os.path.join(ROOT, os.path.dirname(rel))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # bench scripts import their sibling benchlib (experiments/ add bench/)
    spec = importlib.util.spec_from_file_location("script_" + rel.replace(os.sep, "_")[:-3], os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    parser = parser[0] if isinstance(parser, tuple) else parser
    return parser.format_help()


def test_the_scripts_are_found():
    found = set(scripts())
    assert {"train.py", "eval.py", "embed.py", "data_prep.py", "hp_search.py", "hp_search_slurm.py"} <= found


@pytest.mark.parametrize("rel", scripts())
def test_help_ends_with_an_example_command(rel):
    lines = help_text(rel).rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.lower().startswith("example"))
    example = lines[start + 1 :]
    assert example and all(line.startswith("  ") for line in example), f"{rel}: help ends with {lines[-1]!r}"
    assert any(line.strip().startswith(f"python {rel}") for line in example), f"{rel}: no `python {rel}` example"


def test_a_person_at_a_terminal_sees_the_configuration_and_progress_bars(tmp_path):
    """train.py prints its commit and sorted arguments first; training, data prep and embedding draw tqdm bars."""
    import json

    from tiny_data import run_on_terminal, write_kaldi_dir

    py = sys.executable
    cp = str(tmp_path / "cp")
    code, out, terminal = run_on_terminal([py, "train.py", "--epochs", "1", "--checkpoint-path", cp], cwd=ROOT)
    assert code == 0, terminal[-500:]
    first, second = out.splitlines()[:2]
    assert first.startswith("e2e-verification ") and "device cpu" in first
    config = json.loads(second)
    assert config["epochs"] == 1 and config["checkpoint_path"] == cp and list(config) == sorted(config)
    assert b"epoch 1/1" in terminal and b"scoring pairs" in terminal

    kaldi = str(tmp_path / "kaldi")
    write_kaldi_dir(kaldi, n_speakers=3, n_utts=6, ncoef=23)
    code, _, terminal = run_on_terminal(
        [py, "data_prep.py", "--path-to-data", kaldi, "--out-path", str(tmp_path), "--out-name", "t.hdf"], cwd=ROOT
    )
    assert code == 0 and b"utterances" in terminal and b"18/18" in terminal

    argv = ["--train-hdf-file", str(tmp_path / "t.hdf"), "--model", "TDNN", "--n-frames", "20", "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--checkpoint-path", str(tmp_path / "scp")]  # fmt: skip
    code, _, terminal = run_on_terminal([py, "train.py", *argv], cwd=ROOT)
    assert code == 0, terminal[-500:]
    checkpoint = str(tmp_path / "scp" / "checkpoint_1ep.pt")
    code, _, terminal = run_on_terminal(
        [py, "embed.py", "--data", kaldi, "--cp-path", checkpoint, "--out-path", str(tmp_path / "emb")], cwd=ROOT
    )
    assert code == 0 and b"embedding" in terminal and b"18/18" in terminal
