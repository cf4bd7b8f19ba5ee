"""The README's wav-to-EER section, run as written (on a subset of the prompts, with short crops)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tools import asterisk_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "### From wav files to an EER table"

pytestmark = pytest.mark.skipif(
    not os.path.isdir(asterisk_set.SOUNDS) or shutil.which("sox") is None,
    reason="Asterisk prompt packages or sox not installed",
)


def readme_block(heading):
    """The first fenced code block after `heading` in README.md."""
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(heading)
    return re.search(r"```\n(.*?)```", text[start:], re.S).group(1)


def without_apt(block):
    """Drop the `sudo apt-get install ...` command (and its continuation lines): CI installs the packages."""
    kept, skipping = [], False
    for line in block.splitlines():
        if line.startswith("sudo apt-get"):
            skipping = True
        if not skipping:
            kept.append(line)
        if skipping and not line.rstrip().endswith("\\"):
            skipping = False
    return "\n".join(kept) + "\n"


def test_readme_speech_section_runs_as_written(tmp_path):
    script = without_apt(readme_block(SECTION))
    # Two edits keep it to a minute: 24 prompts per speaker, 50-frame crops and no loader processes.
    for old, new in (
        ("--out data/asterisk --seed 0", "--out data/asterisk --seed 0 --max-per-speaker 24"),
        ("--logdir runs/asterisk", "--logdir runs/asterisk --n-frames 50 --workers 0 --verbose 0"),
    ):
        assert old in script, f"the README no longer has {old!r}"
        script = script.replace(old, new)
    path = tmp_path / "readme.sh"
    path.write_text("set -euo pipefail\n" + script)
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for name in ("tools", "recipes", "data_prep.py", "train.py", "eval.py", "embed.py"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    proc = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(re.findall(r"^scorer +eer ", proc.stdout, re.M)) == 2  # the width follows the longest scorer name
    for out in (
        "results/asterisk_test.out",
        "results/asterisk_valid.out",
        "exp/asterisk_emb/embeddings.scp",
        "results/asterisk_test.out.e2e_det.png",
        "cp/asterisk/checkpoint_8ep.pt",
    ):
        assert (tmp_path / out).is_file(), out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "runs" / "asterisk"))
