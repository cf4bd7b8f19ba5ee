"""eval.py's back-ends: the scorer list drives every output; e2e logit; headered score files; LLR metrics;
--calibration; bounded all-pairs metrics equal to the whole-array ones; compact and absent score files;
output paths refused before any work."""

import itertools
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from tiny_data import make_image_tree, write_checkpoint, write_kaldi_dir

import calibrate
import eval as eval_script
from e2e_verification import metrics, scoring
from e2e_verification.calibration import read_score_file
from models.verifier import LearnedDistance
from utils import UserError, cli

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_backends")
    data = make_image_tree(str(root / "test"), n_classes=3, per_class=7)
    return data, write_checkpoint(str(root / "cp.pt"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_backends_speech")
    kaldi = str(root / "kaldi")
    write_kaldi_dir(kaldi, n_speakers=4, n_utts=4, ncoef=23)
    small = {"ncoef": 23, "channels": 16, "embedding_size": 6, "latent_size": 8, "mfa_channels": 32}
    small.update(se_bottleneck=8, attention_bottleneck=8)  # 6-dimensional embeddings: a PLDA fits 48 of them
    cp = write_checkpoint(str(root / "ecapa.pt"), "ECAPA_TDNN", 4, small)
    return kaldi, cp


def speech_argv(speech, out, *extra):
    kaldi, cp = speech
    return ["--cp-path", cp, "--test-data", kaldi, "--trials-path", kaldi + "/trials", "--out-path", out, *CPU, *extra]


def data_lines(path):
    return [line.split() for line in open(path) if not line.startswith("#")]


# ----------------------------------------------------------------------------- the scorer list


def test_a_new_scorer_entry_appears_in_file_json_tables_and_plots(images, tmp_path, monkeypatch, capsys):
    fake = scoring.Scorer("negcos_llr", lambda b: -3.0 * b["cos"], "a test scorer", is_llr=True, title="fake")
    monkeypatch.setattr(scoring, "SCORERS", (*scoring.SCORERS, fake))
    data, cp = images
    out = str(tmp_path / "scores.out")
    assert eval_script.main(["--data-path", data, "--cp-path", cp, "--out-path", out, "--plot", *CPU]) == 0
    names = [s.name for s in scoring.SCORERS]
    provenance, header = open(out).readlines()[:2]
    assert provenance.startswith(scoring.PROVENANCE_LINE) and json.loads(provenance[len(scoring.PROVENANCE_LINE) :])
    assert header.split() == ["#", "enroll", "test", *names, "label"]
    rows = data_lines(out)
    cos, negcos = names.index("cos") + 2, names.index("negcos_llr") + 2
    assert all(abs(float(r[negcos]) + 3 * float(r[cos])) < 1e-5 for r in rows)
    summary = json.load(open(out + ".json"))
    assert summary["columns"] == names and set(summary["metrics"]) == set(names)
    assert summary["scorers"]["negcos_llr"]["is_llr"] and not summary["scorers"]["cos"]["is_llr"]
    assert set(summary["metrics"]["negcos_llr"]) == set(scoring.ROC_KEYS) | set(scoring.LLR_KEYS)
    assert set(summary["metrics"]["cos"]) == set(scoring.ROC_KEYS)
    printed = capsys.readouterr().out
    table_rows = [line.split()[0] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert table_rows == [*names, "e2e_logit", "negcos_llr"]  # the EER table, then the LLR table
    assert os.path.isfile(out + ".negcos_llr_det.png") and os.path.isfile(out + ".negcos_llr_hist.png")


def test_table_keeps_short_names_as_before_and_widens_for_long_ones():
    values = dict.fromkeys(scoring.ROC_KEYS, 0.125)
    short = scoring.format_table({"e2e": values, "cos": values}, scoring.ROC_KEYS)
    assert short == metrics.format_metrics_table({"e2e": values, "cos": values})
    before = "\n".join(  # the layout tables had before long names existed: 8-wide names, 14-wide columns
        [f"{'scorer':<8}" + "".join(f"{k:>14}" for k in scoring.ROC_KEYS)]
        + [f"{n:<8}" + "".join(f"{0.125:>14.4f}" for _ in scoring.ROC_KEYS) for n in ("e2e", "cos")]
    )
    assert short == before
    wide = scoring.format_table({"e2e": values, "cal_e2e_logit+cos": values}, scoring.ROC_KEYS).splitlines()
    assert len({len(line) for line in wide}) == 1  # aligned
    assert wide[2].startswith("cal_e2e_logit+cos ") and wide[1].split() == ["e2e", *["0.1250"] * 4]
    assert scoring.format_table({"e2e_logit": values}, scoring.ROC_KEYS).startswith("scorer             eer")


def test_validation_history_keys_come_from_the_list():
    from e2e_verification import train_loop

    validated = [f"{s.name}_eer" for s in scoring.SCORERS if s.validate]
    assert validated == ["e2e_eer", "cos_eer", "fus_eer"]
    assert train_loop.HISTORY_KEYS == ("train_loss", "ce_loss", "bin_loss", *validated, "lr")


# ----------------------------------------------------------------------------- e2e logit


@pytest.mark.parametrize("pair_features", ["concat", "sym"])
def test_e2e_logit_is_the_mean_of_the_heads_logits(pair_features):
    torch.manual_seed(0)
    distance = LearnedDistance(12, 16, 2, 0.25, ndiscriminators=3, pair_features=pair_features).eval()
    n = 15
    emb = torch.randn(n, 12)
    labels = torch.arange(n) % 3
    idx_a, idx_b = (torch.tensor(x) for x in zip(*itertools.combinations(range(n), 2)))
    with torch.no_grad():
        naive = distance(emb[idx_a], emb[idx_b])  # (heads, pairs), each pair through the naive form
    all_pairs, _ = scoring.score_all_pairs(distance, emb, labels, chunk_elements=7 * 16 * 3)
    trials = scoring.score_trials(distance, emb, idx_a, idx_b, chunk_elements=5 * 16 * 3)
    table = scoring.all_pairs_table(distance, emb, labels, chunk_elements=7 * 16 * 3)
    for scores in (all_pairs["e2e_logit"], trials["e2e_logit"], torch.from_numpy(table.whole("logit"))):
        torch.testing.assert_close(scores, naive.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(all_pairs["e2e"], torch.sigmoid(naive).mean(0), atol=1e-6, rtol=0)
    assert not torch.allclose(torch.sigmoid(all_pairs["e2e_logit"]), all_pairs["e2e"], atol=1e-6)  # 3 heads differ


# ----------------------------------------------------------------------------- score files


def test_header_names_the_columns_and_legacy_files_still_read(speech, tmp_path):
    out = str(tmp_path / "scores.out")
    assert eval_script.main(speech_argv(speech, out)) == 0
    columns, labels, enroll, test = read_score_file(out)
    assert list(columns) == [s.name for s in scoring.SCORERS]
    summary = json.load(open(out + ".json"))
    assert len(labels) == summary["trials"] == 120 and int(labels.sum()) == summary["targets"]
    logit = columns["e2e_logit"]
    assert len(np.unique(logit)) > 100  # written with real precision, not rounded to 6 decimals
    eer = metrics.compute_eer(logit.astype(np.float32), labels)
    assert eer == pytest.approx(summary["metrics"]["e2e_logit"]["eer"], abs=1e-9)
    legacy = tmp_path / "legacy.out"
    legacy.write_text("".join(" ".join([r[0], r[1], *r[2:5], r[-1]]) + "\n" for r in data_lines(out)))
    old_columns, old_labels, old_enroll, _ = read_score_file(str(legacy))
    assert list(old_columns) == ["e2e", "cos", "fus"] and old_enroll == enroll
    np.testing.assert_array_equal(old_labels, labels)
    np.testing.assert_array_equal(old_columns["cos"], columns["cos"])


def test_npz_score_file_holds_the_same_scores_and_no_score_file_only_json(speech, tmp_path):
    text, npz = str(tmp_path / "scores.out"), str(tmp_path / "scores.npz")
    assert eval_script.main(speech_argv(speech, text)) == 0
    assert eval_script.main(speech_argv(speech, npz, "--score-format", "npy")) == 0
    columns, labels, enroll, test = scoring.read_table_npz(npz)
    want, want_labels, want_enroll, want_test = read_score_file(text)
    assert list(columns) == list(want) and all(columns[n].dtype == np.float32 for n in columns)
    for name in want:
        np.testing.assert_allclose(columns[name], want[name], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(labels, want_labels)
    assert enroll.tolist() == want_enroll and test.tolist() == want_test
    assert json.load(open(npz + ".json"))["metrics"] == json.load(open(text + ".json"))["metrics"]
    only = tmp_path / "only" / "scores.out"
    only.parent.mkdir()
    assert eval_script.main(speech_argv(speech, str(only), "--no-score-file")) == 0
    assert sorted(os.listdir(only.parent)) == ["scores.out.json"]


# ----------------------------------------------------------------------------- LLR metrics and calibration


def test_calibration_end_to_end(speech, tmp_path, capsys):
    dev = str(tmp_path / "dev.out")
    assert eval_script.main(speech_argv(speech, dev)) == 0
    cal = str(tmp_path / "cal.json")
    assert calibrate.main(["--scores", dev, "--out", cal]) == 0
    capsys.readouterr()
    out = str(tmp_path / "scores.out")
    assert eval_script.main(speech_argv(speech, out, "--calibration", cal)) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(out + ".json"))
    params = json.load(open(cal))
    added = ["cal_e2e_logit", "cal_cos", "cal_e2e_logit+cos"]
    base = [s.name for s in scoring.SCORERS]
    assert summary["columns"][:4] == base and set(summary["columns"][4:]) == set(added)
    assert len(summary["metrics"]) == 7
    columns, labels, _, _ = read_score_file(out)
    a, b = params["calibrations"]["cos"]["a"], params["calibrations"]["cos"]["b"]
    np.testing.assert_allclose(columns["cal_cos"], a * columns["cos"] + b, atol=1e-5 * (1 + abs(a)))
    fusion = params["fusions"]["e2e_logit+cos"]
    fused = fusion["bias"] + sum(w * columns[c] for c, w in fusion["weights"].items())
    rounding = 1e-6 * sum(abs(w) for w in fusion["weights"].values())  # cos is written with 6 decimals
    np.testing.assert_allclose(columns["cal_e2e_logit+cos"], fused, atol=rounding + 1e-4, rtol=1e-6)
    for name in ("e2e_logit", *added):
        got = summary["metrics"][name]
        want = metrics.llr_metrics(columns[name].astype(np.float32), labels)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, key)
    # calibrated on the same trials: Cllr close to minCllr, below the raw cosine read as an LLR
    assert summary["metrics"]["cal_cos"]["cllr"] < metrics.cllr(columns["cos"], labels)
    header = [line for line in printed.splitlines() if line.startswith("scorer")]
    assert len(header) == 2 and "cllr" in header[1] and "act_dcf_0.01" in header[1]
    llr_rows = [line for line in printed.splitlines() if line.split()[:1] in (["cal_e2e_logit+cos"], ["cal_cos"])]
    assert len(llr_rows) == 4 and len({len(line) for line in [*llr_rows, *header]}) == 1  # aligned


def test_bad_calibration_is_refused_before_the_checkpoint_is_read(tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"p_target": 0.01, "calibrations": {"plda": {"a": 1.0, "b": 0.0}}, "fusions": {}}))
    argv = ["--cp-path", str(tmp_path / "missing.pt"), "--calibration", str(bad), *CPU]
    with pytest.raises(UserError, match="no column 'plda'"):
        eval_script.main(argv)


# ----------------------------------------------------------------------------- bounded all-pairs metrics


def score_sets():
    rng = np.random.default_rng(0)
    for n, rate, kind in [(2, 0.5, "normal"), (3000, 0.1, "normal"), (2500, 0.3, "ties"), (999, 0.5, "zeros")]:
        labels = np.arange(n) < max(1, int(rate * n))
        rng.shuffle(labels)
        if kind == "normal":
            s = rng.normal(size=n) + 1.5 * labels
        elif kind == "ties":
            s = np.round(rng.normal(size=n) + labels, 1)
        else:  # integers, with -0.0 and 0.0 both present
            s = rng.integers(-3, 3, n) * 1.0
            s[s == 0] = np.where(rng.random(int((s == 0).sum())) < 0.5, -0.0, 0.0)
        yield s.astype(np.float32), labels


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_bounded_metrics_equal_whole_array_metrics(chunk):
    for s, labels in score_sets():
        table = scoring.PairTable(s, s, s, labels, idx=(np.zeros(len(s), np.int64),) * 2)
        got = scoring.table_metrics(table, scoring.SCORERS, "cos", llr=True, chunk=chunk)
        want = metrics.compute_metrics(s, labels)
        assert {k: got[k] for k in want} == want  # EER, minDCF and AUC: exactly
        llr = metrics.llr_metrics(s, labels)
        for key in llr:
            assert got[key] == pytest.approx(llr[key], rel=1e-12, abs=1e-12), key


def test_bounded_all_pairs_equals_the_unbounded_path(device):
    torch.manual_seed(1)
    n = 61
    distance = LearnedDistance(10, 12, 1, 0.25, ndiscriminators=2).to(device).eval()
    emb = torch.randn(n, 10, device=device)
    labels = torch.randint(0, 4, (n,), device=device)
    scores, target = scoring.score_all_pairs(distance, emb, labels, chunk_elements=9 * 24)
    table = scoring.all_pairs_table(distance, emb, labels, chunk_elements=9 * 24, piece=100)  # 19 pieces
    assert len(table.base["cos"]) == 19
    np.testing.assert_array_equal(table.target, target.cpu().numpy())
    whole = scoring.evaluate_scores({k: v.cpu() for k, v in scores.items()}, target.cpu())
    for s in scoring.SCORERS:
        np.testing.assert_array_equal(table.column(scoring.SCORERS, s.name, chunk=100), scores[s.name].cpu().numpy())
        got = scoring.table_metrics(table, scoring.SCORERS, s.name, chunk=50)
        assert got == whole[s.name]
    spent = scoring.all_metrics(table, scoring.SCORERS, consume=True)  # frees the table as it goes
    for name, values in spent.items():
        assert {k: values[k] for k in whole[name]} == whole[name]
    assert all(piece is None for pieces in table.base.values() for piece in pieces)
    a, b = table.indices(0, len(table))
    pairs = np.array(list(itertools.combinations(range(n), 2)))
    np.testing.assert_array_equal(np.stack([a, b], 1), pairs)
    np.testing.assert_array_equal(np.stack(table.indices(100, 1000), 1), pairs[100:1000])


# ----------------------------------------------------------------------------- output paths, before any work


def refused(argv, capsys):
    """Run eval.py through utils.cli (exit 2, one stderr line) with a checkpoint that does not exist: an error
    about the output path proves it was checked first."""
    with pytest.raises(SystemExit) as exit_info:
        cli(eval_script.main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    return err


def test_output_paths_are_checked_up_front(tmp_path, capsys):
    missing_cp = ["--cp-path", str(tmp_path / "missing.pt"), *CPU]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "which is a file" in refused(["--out-path", str(a_file / "scores.out"), *missing_cp], capsys)
    assert "which is a file" in refused(["--out-path", str(a_file / "sub" / "scores.out"), *missing_cp], capsys)
    folder = tmp_path / "results"
    (folder / "scores.out").mkdir(parents=True)
    assert "is a folder" in refused(["--out-path", str(folder), *missing_cp], capsys)
    (tmp_path / "s.out.json").mkdir()
    assert "is a folder" in refused(["--out-path", str(tmp_path / "s.out"), *missing_cp], capsys)
    assert "does not exist" in refused(["--out-path", str(tmp_path / "no" / "s.out"), *missing_cp], capsys)
    assert "checkpoint not found" in refused(["--out-path", str(tmp_path / "ok.out"), *missing_cp], capsys)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_unwritable_output_folder_is_refused_up_front(tmp_path, capsys):
    """As root a chmod'ed folder stays writable, so the test uses a folder no one can create files in."""
    folder = "/proc/self"
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        pass
    else:
        os.close(fd)
        os.remove(probe)
        pytest.skip(f"{folder} takes new files here")
    err = refused(["--out-path", folder + "/scores.out", "--cp-path", str(tmp_path / "missing.pt"), *CPU], capsys)
    assert "cannot write in output folder /proc/self" in err


# ----------------------------------------------------------------------------- S-norm, AS-norm and PLDA


def direct_snorm(raw, cohort_e, cohort_t, top_n=None):
    """0.5 ((s - mean_e) / std_e + (s - mean_t) / std_t) of one trial from its sides' cohort scores (float64)."""
    stats = []
    for scores in (cohort_e, cohort_t):
        scores = np.sort(np.asarray(scores, dtype=np.float64))[::-1][:top_n]
        stats.append((scores.mean(), scores.std()))
    return 0.5 * ((raw - stats[0][0]) / stats[0][1] + (raw - stats[1][0]) / stats[1][1])


def cohort_spread(scores, top_n=None):
    """The population std of one item's (top_n highest) cohort scores, as direct_snorm divides by it."""
    return np.sort(np.asarray(scores, dtype=np.float64))[::-1][:top_n].std()


def check_normalised(columns, emb, pairs, cohort, distance, top_n, rel=0.0, raw_error=0.0):
    """Every S-norm / AS-norm column of `columns` against a per-trial loop: cosines by numpy, logits by the
    learned distance's naive per-pair form; to 1e-5 + rel * |value| + raw_error / (the smaller cohort spread of
    the two sides): `raw_error` is the float32 rounding of a raw score, which the normalisation divides by the
    spread (the all-pairs and per-pair forms of the learned distance sum in different orders)."""
    emb64, cohort64 = emb.double().numpy(), cohort.double().numpy()
    unit = emb64 / np.linalg.norm(emb64, axis=1, keepdims=True)
    cohort_unit = cohort64 / np.linalg.norm(cohort64, axis=1, keepdims=True)
    with torch.no_grad():
        logits = {i: distance(emb[i].expand(len(cohort), -1), cohort).mean(0).double().numpy() for i in range(len(emb))}
        raw_logit = distance(emb[pairs[:, 0]], emb[pairs[:, 1]]).mean(0).double().numpy()
    for k, (i, j) in enumerate(pairs):
        for raw, cohort_scores, name in (
            (unit[i] @ unit[j], lambda x: cohort_unit @ unit[x], "cos"),
            (raw_logit[k], lambda x: logits[x], "e2e_logit"),
        ):
            for prefix, n in (("snorm", None), ("asnorm", top_n)):
                want = direct_snorm(raw, cohort_scores(i), cohort_scores(j), n)
                error = abs(columns[f"{prefix}_{name}"][k] - want)
                spread = min(cohort_spread(cohort_scores(i), n), cohort_spread(cohort_scores(j), n))
                bound = 1e-5 + rel * abs(want) + raw_error / spread
                assert error <= bound, (prefix, name, k, columns[f"{prefix}_{name}"][k], want)


@pytest.mark.parametrize("top_n", [5, 10, 15])
def test_snorm_scorers_equal_a_per_trial_loop(top_n):
    """The normalised scorers over all pairs and over a trial list, well-spread embeddings: 1e-5 absolute."""
    from e2e_verification import backends

    torch.manual_seed(2)
    distance = LearnedDistance(8, 12, 1, 0.25, ndiscriminators=2).eval()
    emb, cohort = torch.randn(20, 8), torch.randn(15, 8)
    scorers = [*scoring.SCORERS, *backends.normalised_scorers(distance, emb, cohort, top_n)]
    assert [s.name for s in scorers[4:]] == ["snorm_cos", "asnorm_cos", "snorm_e2e_logit", "asnorm_e2e_logit"]
    table = scoring.all_pairs_table(distance, emb, torch.arange(20) % 4)
    columns = {s.name: table.column(scorers, s.name, chunk=33) for s in scorers}
    check_normalised(columns, emb, np.stack(table.indices(0, len(table)), 1), cohort, distance, top_n)
    pairs = np.random.default_rng(0).integers(0, 20, (50, 2))
    table = scoring.trials_table(distance, emb, pairs[:, 0], pairs[:, 1], pairs[:, 0] % 2 == 0)
    columns = {s.name: table.column(scorers, s.name, chunk=7) for s in scorers}
    check_normalised(columns, emb, pairs, cohort, distance, top_n)


def test_snorm_and_asnorm_on_speech_trials_equal_a_per_trial_loop(speech, tmp_path):
    import embed
    from e2e_verification.checkpoints import load_model
    from e2e_verification.scoring import embed_matrices

    kaldi, cp = speech
    cohort_dir = str(tmp_path / "cohort")
    write_kaldi_dir(cohort_dir, n_speakers=3, n_utts=3, ncoef=23, seed=5, prefix="coh")
    out = str(tmp_path / "scores.npz")
    argv = speech_argv(speech, out, "--cohort", cohort_dir, "--cohort-top-n", "4", "--score-format", "npy")
    assert eval_script.main(argv) == 0
    columns, labels, enroll, test = scoring.read_table_npz(out)
    names = ["snorm_cos", "asnorm_cos", "snorm_e2e_logit", "asnorm_e2e_logit"]
    assert all(name in columns for name in names)
    model = load_model(cp, None, torch.device("cpu"))
    feats = kaldiio_feats(kaldi)
    ids, emb = embed_matrices(model, ((u, m.T) for u, m in feats.items()), torch.device("cpu"))
    _, cohort = embed_matrices(model, ((u, m.T) for u, m in kaldiio_feats(cohort_dir).items()), torch.device("cpu"))
    index = {u: k for k, u in enumerate(ids)}
    pairs = np.array([[index[a], index[b]] for a, b in zip(enroll, test)])
    # Untrained embeddings are nearly parallel: float32 cosines of ~0.999 over a top-4 deviation of ~1e-3 keep
    # ~1e-4 relative; test_snorm_scorers_equal_a_per_trial_loop checks 1e-5 absolute on well-spread embeddings.
    check_normalised(columns, emb, pairs, cohort, model.distance, 4, rel=1e-3)
    # the cohort as embed.py's embeddings.h5 gives the same columns
    argv = ["--data", cohort_dir, "--cp-path", cp, "--out-path", str(tmp_path / "emb"), "--min-frames", "100"]
    assert embed.main([*argv, *CPU]) == 0
    again = str(tmp_path / "again.npz")
    argv = speech_argv(speech, again, "--cohort", str(tmp_path / "emb" / "embeddings.h5"), "--cohort-top-n", "4")
    assert eval_script.main([*argv, "--score-format", "npy"]) == 0
    for name in names:
        np.testing.assert_allclose(scoring.read_table_npz(again)[0][name], columns[name], atol=1e-5)


def kaldiio_feats(folder):
    import kaldiio

    return {u: np.asarray(m) for u, m in sorted(kaldiio.load_scp(os.path.join(folder, "feats.scp")).items())}


def test_snorm_on_images_with_an_image_folder_cohort(images, tmp_path):
    from torch.utils.data import DataLoader

    import data_load
    from e2e_verification.checkpoints import load_model

    data, cp = images
    cohort_dir = make_image_tree(str(tmp_path / "cohort"), n_classes=2, per_class=5, seed=3)
    out = str(tmp_path / "scores.npz")
    argv = ["--data-path", data, "--cp-path", cp, "--out-path", out, "--cohort", cohort_dir, "--score-format", "npy"]
    assert eval_script.main([*argv, "--cohort-top-n", "6", *CPU]) == 0
    columns, labels, enroll, test = scoring.read_table_npz(out)
    model = load_model(cp, None, torch.device("cpu"))

    def embed_folder(path):
        loader = DataLoader(data_load.load_images(path, "test"), batch_size=64)
        return scoring.embed_loader(model, loader, torch.device("cpu"))[0]

    pairs = np.stack([enroll.astype(int), test.astype(int)], 1)
    cohort = embed_folder(cohort_dir)
    check_normalised(columns, embed_folder(data), pairs, cohort, model.distance, 6, rel=1e-3, raw_error=1e-6)


def test_plda_end_to_end_embed_train_plda_eval(speech, tmp_path, capsys):
    import embed
    import train_plda
    from e2e_verification.plda import PLDA

    kaldi, cp = speech
    train_dir = str(tmp_path / "train")
    write_kaldi_dir(train_dir, n_speakers=8, n_utts=6, ncoef=23, seed=7, prefix="trn")
    for source, folder in ((train_dir, "train_emb"), (kaldi, "test_emb")):
        argv = ["--data", source, "--cp-path", cp, "--out-path", str(tmp_path / folder), "--min-frames", "100"]
        assert embed.main([*argv, *CPU]) == 0  # eval.py's tiling, so the test embeddings are the same
    model_path = str(tmp_path / "plda.json")
    argv = ["--embeddings", str(tmp_path / "train_emb"), "--out", model_path, "--lda-dim", "4"]
    assert train_plda.main(argv) == 0
    out = str(tmp_path / "scores.out")
    assert eval_script.main(speech_argv(speech, out, "--plda", model_path)) == 0
    summary = json.load(open(out + ".json"))
    assert summary["scorers"]["plda"]["is_llr"] and "min_cllr" in summary["metrics"]["plda"]
    assert "plda" in [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    columns, labels, enroll, test = read_score_file(out)
    import h5py

    with h5py.File(tmp_path / "test_emb" / "embeddings.h5", "r") as h5:
        vectors = {u: h5[u][()] for u in h5}
    plda = PLDA.load(model_path)
    want = plda.score(np.stack([vectors[u] for u in enroll]), np.stack([vectors[u] for u in test]))
    np.testing.assert_allclose(columns["plda"], want, rtol=1e-4, atol=1e-4)


def test_a_plda_model_of_another_size_is_refused_before_embedding(speech, tmp_path):
    from e2e_verification.plda import PLDA

    rng = np.random.default_rng(0)
    model_path = str(tmp_path / "plda.json")
    PLDA().from_covariances(np.zeros(5), np.eye(5), np.eye(5)).save(model_path)
    with pytest.raises(UserError, match="size 5"):
        eval_script.main(speech_argv(speech, str(tmp_path / "s.out"), "--plda", model_path))
    assert not os.path.exists(tmp_path / "s.out") and rng is not None
