"""The user's view of every script: --help ends with an example command line of that script."""

import glob
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts():
    """Every command-line script of the project (top level, tools/, bench/): files with a __main__ block."""
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
        sys.path.insert(0, folder)  # bench scripts import their sibling benchlib
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
