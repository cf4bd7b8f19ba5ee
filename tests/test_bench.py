"""The bench scripts run end to end at tiny sizes and their built-in checks hold (no timing is asserted)."""

import importlib
import os
import re

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script by name, with bench/ on sys.path as when it runs as a script."""
    monkeypatch.syspath_prepend(BENCH)
    return lambda name: importlib.import_module(name)


def test_allpairs_split_matches_concatenated(bench, capsys):
    argv = ["--device", "cpu", "--n", "40", "--hidden-size", "16", "--n-hidden", "2", "--ndiscriminators", "2"]
    assert bench("allpairs").main(argv + ["--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|split - concatenated\| (\S+)", out).group(1)) < 1e-5
    assert re.search(r"all-pairs scoring, split: .* -> [\d.]+x", out)


def test_metrics_agree_with_roc_curve(bench, capsys):
    assert bench("metric_speed").main(["--device", "cpu", "--n", "20000", "--decimals", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"\|difference\| (\S+)\)", out).group(1)) < 1e-9
    assert "vs bare argsort" in out and "vs roc_curve" in out


def test_prep_throughput(bench, capsys, tmp_path):
    argv = ["--speakers", "3", "--utts", "4", "--frames", "40", "--repeats", "1", "--work-dir", str(tmp_path)]
    assert bench("prep_throughput").main(argv) == 0
    assert "the time of reading the ark bytes" in capsys.readouterr().out
    assert (tmp_path / "train.hdf").is_file()


def test_train_throughput(bench, capsys, tmp_path):
    argv = ["--device", "cpu", "--batch-size", "10", "--n-frames", "40", "--steps", "1", "--warmup", "1"]
    argv += ["--repeats", "1", "--workers", "0", "--speakers", "4", "--work-dir", str(tmp_path)]
    assert bench("train_throughput").main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("of the in-memory bound") == 2, out
