"""calibrate.py in-process on generated score files (with and without a header line), and its user errors."""

import json
import os

import numpy as np
import pytest

import calibrate
from e2e_verification.calibration import apply_calibration, load_calibration, read_score_file
from e2e_verification.metrics import act_dcf, cllr
from utils import cli


def write_scores(path, header=True, n=4000, seed=0):
    """A score file like eval.py's: e2e (probability), e2e_logit, cos, fus; 1 target in 5."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    sign = np.where(labels, 1.0, -1.0)
    logit = 2.0 * rng.normal(size=n) + 2.5 * sign
    cos = 0.2 * rng.normal(size=n) + 0.3 * sign + 0.2
    e2e = 1.0 / (1.0 + np.exp(-logit))
    fus = (e2e + cos) / 2
    with open(path, "w") as handle:
        if header:
            handle.write("# enroll test e2e e2e_logit cos fus label\n")
        for i in range(n):
            cols = (e2e[i], logit[i], cos[i], fus[i]) if header else (e2e[i], cos[i], fus[i])
            word = "target" if labels[i] else "nontarget"
            handle.write(f"u{i} v{i} " + " ".join(f"{c:.6f}" for c in cols) + f" {word}\n")
    return str(path)


def test_calibrate_with_header_fits_the_defaults(tmp_path, capsys):
    scores = write_scores(tmp_path / "dev.scores")
    out = str(tmp_path / "cal.json")
    assert calibrate.main(["--scores", scores, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "cal_e2e_logit+cos" in printed and "before" in printed and "act_dcf_0.01" in printed
    params = load_calibration(out, columns=["e2e", "e2e_logit", "cos", "fus"])
    assert sorted(params["calibrations"]) == ["cos", "e2e_logit"]
    assert list(params["fusions"]) == ["e2e_logit+cos"]
    saved = json.load(open(out))
    assert saved["dev_scores"] == scores and "cal_cos" in saved["dev_metrics"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # calibration lowers the development Cllr and actDCF of the cosine (raw cosines are no LLRs)
    columns, labels, _, _ = read_score_file(scores)
    cal = apply_calibration(params, columns)
    assert cllr(cal["cal_cos"], labels) < cllr(columns["cos"], labels)
    assert act_dcf(cal["cal_cos"], labels, 0.01) < act_dcf(columns["cos"], labels, 0.01)
    assert saved["dev_metrics"]["cal_cos"]["cllr"] == pytest.approx(cllr(cal["cal_cos"], labels))


def test_calibrate_legacy_file_and_explicit_choices(tmp_path):
    scores = write_scores(tmp_path / "legacy.scores", header=False)
    out = str(tmp_path / "cal.json")
    assert calibrate.main(["--scores", scores, "--out", out]) == 0
    params = load_calibration(out)
    assert list(params["calibrations"]) == ["cos"] and params["fusions"] == {}  # no e2e_logit: no default fusion
    args = ["--scores", scores, "--out", out, "--p-target", "0.05", "--scorers", "e2e", "--fuse", "e2e,cos", "cos,fus"]
    assert calibrate.main(args) == 0
    params = load_calibration(out)
    assert params["p_target"] == 0.05 and list(params["calibrations"]) == ["e2e"]
    assert sorted(params["fusions"]) == ["cos+fus", "e2e+cos"]  # the JSON keys are sorted
    assert calibrate.main(["--scores", scores, "--out", out, "--fuse"]) == 0  # --fuse alone: no fusion
    assert load_calibration(out)["fusions"] == {}


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "cannot read score file"),
        ("not_a_number", ":3: a score is not a number"),
        ("unknown_scorer", "no column 'plda'"),
        ("unknown_fused", "no column 'nope'"),
        ("one_class", "target and non-target"),
        ("p_target", "--p-target must lie"),
        ("out_folder", "output folder does not exist"),
        ("abbreviation", "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, match):
    good = write_scores(tmp_path / "dev.scores", n=50)
    lines = open(good).read().splitlines(keepends=True)
    bad = tmp_path / "bad.scores"
    if case == "not_a_number":
        bad.write_text("".join(lines[:2] + [lines[2].replace(" ", " x", 3)[:-1] + "\n"] + lines[3:]))
    if case == "one_class":
        bad.write_text("".join(line for line in lines if "nontarget" in line or line.startswith("#")))
    out = str(tmp_path / "cal.json")
    argv = {
        "missing": ["--scores", str(tmp_path / "nothing"), "--out", out],
        "not_a_number": ["--scores", str(bad), "--out", out],
        "unknown_scorer": ["--scores", good, "--out", out, "--scorers", "cos", "plda"],
        "unknown_fused": ["--scores", good, "--out", out, "--fuse", "cos,nope"],
        "one_class": ["--scores", str(bad), "--out", out],
        "p_target": ["--scores", good, "--out", out, "--p-target", "1"],
        "out_folder": ["--scores", good, "--out", str(tmp_path / "no" / "cal.json")],
        "abbreviation": ["--scores", good, "--out", out, "--p-tar", "0.1"],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        cli(calibrate.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not os.path.exists(out)
