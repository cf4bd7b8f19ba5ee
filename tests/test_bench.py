"""The bench scripts (bench/) and the accuracy studies (experiments/) run end to end at tiny sizes and their built-in
checks hold (no timing is asserted)."""

import importlib
import itertools
import json
import os
import re

import numpy as np
import pytest

import data_load
from utils import UserError

FASHION = data_load.FASHION_DIR  # the installed Fashion-MNIST IDX folder
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
EXPERIMENTS = os.path.join(ROOT, "experiments")


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script by name, with bench/ on sys.path as when it runs as a script."""
    monkeypatch.syspath_prepend(BENCH)
    return lambda name: importlib.import_module(name)


@pytest.fixture
def experiment(monkeypatch):
    """Import an accuracy study by name, with experiments/ on sys.path as when it runs as a script."""
    monkeypatch.syspath_prepend(EXPERIMENTS)
    return lambda name: importlib.import_module(name)


def published(module, page, name):
    """The record a timing bench wrote beside its page (results/perf/`name`.json); its table is in the page."""
    record = json.loads((page.parent / "results" / "perf" / f"{name}.json").read_text())
    assert record["script"] == f"bench/{module.__name__}.py" and record["command"].startswith("python bench/")
    assert module.render(record) in page.read_text()
    return record


def test_allpairs_split_matches_concatenated(bench, capsys, tmp_path):
    page = tmp_path / "performance.md"
    argv = ["--device", "cpu", "--n", "40", "--hidden-size", "16", "--n-hidden", "2", "--ndiscriminators", "2"]
    assert bench("allpairs").main(argv + ["--repeats", "1", "--out", str(page)]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|split - concatenated\| (\S+)", out).group(1)) < 1e-5
    assert re.search(r"all-pairs scoring, split: .* -> [\d.]+x", out)
    (run,) = published(bench("allpairs"), page, "allpairs")["runs"]
    assert run["pairs"] == 780 and run["max_diff"] < 1e-5 and run["concat_s"] > 0
    sym = ["--device", "cpu", "--n", "30", "--pair-features", "sym", "--no-baseline", "--repeats", "1"]
    assert bench("allpairs").main(sym + ["--out", str(page)]) == 0
    (run,) = published(bench("allpairs"), page, "allpairs_sym")["runs"]
    assert run["concat_s"] is None and "not run" in page.read_text()
    assert page.read_text().count("| what (command) |") == 2  # the concat table kept beside the sym one


def test_metrics_agree_with_roc_curve(bench, capsys, tmp_path):
    page = tmp_path / "performance.md"
    argv = ["--device", "cpu", "--n", "20000", "--decimals", "2", "--repeats", "1", "--out", str(page)]
    assert bench("metric_speed").main(argv) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"\|difference\| (\S+)\)", out).group(1)) < 1e-9
    assert "vs bare argsort" in out and "vs roc_curve" in out
    (run,) = published(bench("metric_speed"), page, "metric_speed")["runs"]
    assert run["n"] == 20000 and run["eer_diff"] < 1e-9 and run["distinct"] < 20000


def test_prep_throughput(bench, capsys, tmp_path):
    page = tmp_path / "performance.md"
    argv = ["--speakers", "3", "--utts", "4", "--frames", "40", "--repeats", "1", "--work-dir", str(tmp_path)]
    assert bench("prep_throughput").main(argv + ["--out", str(page)]) == 0
    assert "the time of reading the ark bytes" in capsys.readouterr().out
    assert (tmp_path / "train.hdf").is_file()
    (run,) = published(bench("prep_throughput"), page, "prep_throughput")["runs"]
    assert run["utterances"] == 12 and run["prep_s"] > 0


def test_train_throughput(bench, capsys, tmp_path):
    page = tmp_path / "performance.md"
    argv = ["--device", "cpu", "--batch-size", "10", "--n-frames", "40", "--steps", "1", "--warmup", "1"]
    argv += ["--repeats", "1", "--workers", "0", "--speakers", "4", "--work-dir", str(tmp_path / "w")]
    assert bench("train_throughput").main(argv + ["--out", str(page)]) == 0
    out = capsys.readouterr().out
    assert out.count("of the in-memory bound") == 2, out
    runs = published(bench("train_throughput"), page, "train_throughput")["runs"]
    assert [(r["model"], r["task"], r["precision"]) for r in runs] == [
        ("TDNN", "speech", "fp32"),
        ("resnet", "image", "fp32"),
    ]


def test_timing_bench_out_is_checked_before_the_work(bench, tmp_path):
    with pytest.raises(UserError, match="--out"):
        bench("metric_speed").main(["--device", "cpu", "--n", "20", "--out", str(tmp_path / "no" / "such" / "p.md")])


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_study_dev_threshold_reaches_the_minimum_cost(experiment, seed):
    """The threshold picked on a set costs exactly that set's minDCF (ties between trials included)."""
    from e2e_verification.metrics import compute_mindcf

    study = experiment("calibration_study")
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.3
    scores = np.round(rng.normal(size=3000) + 2.0 * labels, 1)
    for p_target in (0.01, 0.05, 0.5):
        threshold = study.threshold_at_mindcf(scores, labels, p_target)
        cost = study.dcf_at_threshold(scores, labels, threshold, p_target)
        assert cost == pytest.approx(compute_mindcf(scores, labels, p_target), abs=1e-9)
    everything_rejected = study.threshold_at_mindcf(scores - 100 * labels, labels, 0.01)
    assert everything_rejected == np.inf


def test_speech_backends_calibration_sets(experiment, tmp_path):
    """next / others / halves: what calibrates which test set, and the halves never share an utterance."""
    backends = experiment("speech_backends")
    utt2spk = tmp_path / "utt2spk"
    utts = [(f"{spk}-{i}", spk) for spk in ("a", "b") for i in range(6)]
    utt2spk.write_text("".join(f"{u} {s}\n" for u, s in utts))
    halves = backends.utterance_halves(str(utt2spk))
    assert [halves[f"a-{i}"] for i in range(6)] == [0, 1, 0, 1, 0, 1] and sum(halves.values()) == 6
    pairs = [(u, v) for (u, _), (v, _) in itertools.combinations(utts, 2)]
    labels = np.array([u[0] == v[0] for u, v in pairs])
    scores = {}
    for fold in (3, 5, 6):
        columns = {"cos": np.arange(len(pairs), dtype=float) + 1000 * fold}
        scores[fold] = (columns, labels, [u for u, _ in pairs], [v for _, v in pairs])
    folds = [3, 5, 6]
    made = list(backends.calibration_sets("next", folds, scores, {}))
    assert [name for name, _, _ in made] == ["fold 3 on fold 5", "fold 5 on fold 6", "fold 6 on fold 3"]
    assert made[2][1][0]["cos"][0] == 3000 and made[2][2][0]["cos"][0] == 6000
    others = list(backends.calibration_sets("others", folds, scores, {}))
    assert sorted(set(others[0][1][0]["cos"] // 1000)) == [5, 6] and len(others[0][1][1]) == 2 * len(pairs)
    made = list(backends.calibration_sets("halves", [3], scores, {3: halves}))
    assert [name for name, _, _ in made] == ["fold 3 half 0", "fold 3 half 1"]
    for _, dev, test in made:
        dev_utts = {u for k in dev[0]["cos"].astype(int) % 1000 for u in pairs[k]}
        test_utts = {u for k in test[0]["cos"].astype(int) % 1000 for u in pairs[k]}
        assert not dev_utts & test_utts and len(dev_utts) == len(test_utts) == 6
        assert len(dev[1]) == len(test[1]) == 15 and dev[1].sum() == test[1].sum() == 6


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_image_calibration_on_a_kept_fashion_mnist_run(experiment, tmp_path, capsys):
    """A tiny kept run (accuracy.py's layout) -> both halves calibrated on each other, at two priors."""
    import train

    run = tmp_path / "fmnist-open_concat_1"
    argv = ["--data-path", FASHION, "--valid-data-path", FASHION, "--classes", "0-4", "--valid-classes", "5-9"]
    argv += ["--items-per-class", "20", "--model", "resnet", "--width", "4", "--epochs", "1", "--batch-size", "20"]
    argv += ["--valid-max-items", "50", "--checkpoint-path", str(run / "cp"), "--verbose", "0", "--device", "cpu"]
    assert train.main(argv) == 0
    out = tmp_path / "llr.md"
    flags = ["--runs", str(tmp_path), "--variants", "concat", "--seeds", "1", "--test-items-per-class", "12"]
    assert experiment("image_calibration").main([*flags, "--p-targets", "0.01,0.5", "--out", str(out)]) == 0
    record = json.loads((tmp_path / "llr.json").read_text())
    results = record["runs"]
    assert sorted(results) == ["0.01", "0.5"] and record["script"] == "experiments/image_calibration.py"
    assert experiment("image_calibration").render(record) in out.read_text()
    halves = results["0.5"]["concat"]
    assert sorted(halves) == ["fmnist-open_concat_1 half 0", "fmnist-open_concat_1 half 1"]
    for costs in halves.values():
        assert sorted(costs) == ["cal_cos", "cal_e2e_logit", "cal_e2e_logit+cos", "e2e_logit (raw)"]
        for metrics in costs.values():
            assert 0.0 <= metrics["min_dcf"] <= metrics["act_dcf"] + 1e-12 and metrics["cllr"] > 0
    assert out.read_text().count("| concat | cal_cos | 2 |") == 2
    assert not (run / "pairs.npz").exists()
    with pytest.raises(UserError, match="--p-targets"):
        experiment("image_calibration").main([*flags, "--p-targets", "0.01,1"])


def test_accuracy_scores_the_epoch_its_held_out_classes_chose(experiment, tmp_path):
    """A real digits-open run (train 0-4, validate 5-6): the epoch kept is the one of the lowest validation fused
    EER, eval.py scores it on digits 7-9, and the calibrated LLRs' costs and the curves reach the tables."""
    import train

    accuracy = experiment("accuracy")
    cp = tmp_path / "cp"
    argv = ["--classes", "0-4", "--valid-classes", "5-6", "--epochs", "3", "--hidden-size", "32", "--n-hidden", "1"]
    argv += ["--checkpoint-path", str(cp), "--keep-checkpoints", "0", "--verbose", "0", "--device", "cpu"]
    assert train.main(argv) == 0
    args = accuracy.build_parser().parse_args(["--threads", "1", "--select-by", "fus", "--reuse-kept"])
    assert accuracy.finished(str(cp)) and not accuracy.finished(str(tmp_path))
    accuracy.train(str(cp), ["--no-such-flag"], "concat", args)  # --reuse-kept: trained already, not run again
    found = accuracy.evaluate(str(tmp_path), str(cp), ["--classes", "7-9"], args)
    assert found["cpu_s"] is None  # trained outside accuracy.py: its training CPU was not measured
    fused = found["valid"]["fus"]
    assert len(fused) == 3 and fused[found["epoch"] - 1] == min(fused)
    assert sorted(found["llr"]) == ["cal_cos", "cal_e2e_logit", "cal_e2e_logit+cos"]
    for costs in found["llr"].values():
        assert 0 < costs["min_cllr"] <= costs["cllr"] + 1e-9
        assert 0 <= costs["mindcf_0.5"] <= costs["act_dcf_0.5"] + 1e-9
    run = {"protocol": "digits-open", "variant": "concat", "run": 1, **found, "cpu_s": 6.0}
    assert found["llr"][accuracy.CAL_FUS]["eer"] == accuracy.test_metrics(run)["cal fus"]["eer"]
    other = {**run, "run": 2, "metrics": {s: {**m, "eer": m["eer"] + (0.01 if s == "e2e" else 0)}
                                          for s, m in found["metrics"].items()}}  # fmt: skip
    text = accuracy.render({"runs": [run, other]})
    diff = found["metrics"]["e2e"]["eer"] - found["metrics"]["cos"]["eer"]
    wins = (diff <= 0) + (diff + 0.01 <= 0)
    assert f"({wins}/2, worst {diff + 0.01:+.4f})" in text
    assert "| digits-open | concat | cal_e2e_logit |" in text and "| digits-open | concat | fus | " in text


def test_open_split_flag_gives_the_image_protocols_their_classes(experiment, monkeypatch):
    """--open-split TRAIN/VALID/TEST: accuracy.py trains, validates and tests the open digits on those classes, and
    backend_study.py embeds the same ones; lists that share a class are refused."""
    accuracy, backend_study = experiment("accuracy"), experiment("backend_study")
    default = accuracy.build_parser().parse_args([]).open_split
    assert default == accuracy.OPEN_SPLIT == {"train": "0-4", "valid": "5-6", "test": "7-9"}
    args = accuracy.build_parser().parse_args(["--open-split", "5-9/3-4/0,2"])
    seen = []
    monkeypatch.setattr(accuracy, "train", lambda cp, flags, variant, a: seen.append(flags))  # no training here
    monkeypatch.setattr(accuracy, "evaluate", lambda folder, cp, test, a: test)
    test = accuracy.run_digits("runs/x", 1, "cos", args, open_set=True)
    assert seen == [["--seed", "1", "--classes", "5-9", "--valid-classes", "3-4", "--test-classes", "0,2"]]
    assert test == ["--classes", "0,2"]
    study = backend_study.build_parser().parse_args(["--keep-dir", "k", "--open-split", "5-9/3-4/0,2"])
    sets = backend_study.protocol_data(study, "digits-open", 1)
    assert sets["train"] == ("digits", ["--split", "train", "--classes", "5-9"])
    assert sets["valid"] == ("digits", ["--split", "valid", "--classes", "3-4"])
    assert sets["test"] == ("digits", ["--classes", "0,2"])
    for bad, message in (("0-4/4-5/7-9", "a class is in two"), ("0-4/5-6", "expected TRAIN/VALID/TEST"),
                         ("0-4/x/7-9", "bad class list 'x'")):  # fmt: skip
        with pytest.raises(UserError, match=f"argument --open-split: .*{message}"):
            accuracy.build_parser().parse_args(["--open-split", bad])
