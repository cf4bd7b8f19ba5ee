"""experiments/calibration_transfer.py on a kept digits-open run: the calibration each source gives, checked
against the same fit computed here from the embeddings it wrote."""

import json
import os

import h5py
import numpy as np
import pytest
from tiny_data import write_checkpoint

from e2e_verification.calibration import train_linear_llr
from e2e_verification.metrics import cllr, min_cllr

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def labelled(folder):
    """(unit vectors, digit labels) of an embed.py HDF5 output."""
    with h5py.File(folder / "embeddings.h5") as h5:
        names = sorted(h5)
        vectors = np.stack([h5[n][()] for n in names]).astype(np.float64)
        labels = np.array([h5[n].attrs["spk"] for n in names])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(EXPERIMENTS)
    import calibration_transfer

    return calibration_transfer


def test_each_calibration_is_fitted_on_its_own_trials_and_measured_on_the_test_classes(study, tmp_path):
    cp = tmp_path / "keep" / "digits-open_cos_1" / "cp"
    cp.mkdir(parents=True)
    write_checkpoint(str(cp / "checkpoint_1ep.pt"), "resnet", 5, {"in_channels": 1, "stem": "cifar", "width": 8})
    out = tmp_path / "transfer.md"
    argv = ["--keep-dir", str(tmp_path / "keep"), "--protocols", "digits-open", "--train-items", "40"]
    assert study.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    (run,) = json.loads((tmp_path / "transfer.json").read_text())["runs"]
    results = run["results"]
    assert set(study.SOURCES) <= set(results)

    backends = cp.parent / "backends"
    train, valid, test = (labelled(backends / f"{part}_emb") for part in ("train", "valid", "test"))
    assert set(valid[1]) == {"5", "6"} and set(test[1]) == {"7", "8", "9"}
    a, b = np.triu_indices(len(test[0]), k=1)
    test_scores, target = (test[0][a] * test[0][b]).sum(1), test[1][a] == test[1][b]
    va, vb = np.triu_indices(len(valid[0]), k=1)
    w, offset = train_linear_llr((valid[0][va] * valid[0][vb]).sum(1), valid[1][va] == valid[1][vb], 0.5)
    assert results["validation"]["cllr"] == pytest.approx(cllr(test_scores * w[0] + offset, target), rel=1e-4)
    assert results["min_cllr"] == pytest.approx(min_cllr(test_scores, target), rel=1e-4)
    assert results["no information"]["cllr"] == pytest.approx(1.0)
    for source in study.SOURCES:
        assert results[source]["cllr"] >= results["min_cllr"] - 1e-9, source
    pairs = len(va)
    assert results["training classes"]["fit_trials"] == 40 * 39 // 2
    assert results["validation + training non-targets"]["fit_trials"] == pairs + 40 * len(valid[0])
    assert study.render({"runs": [run]}) in out.read_text()
    assert "| digits-open | no information | 1 | 1.0000 |" in out.read_text()
