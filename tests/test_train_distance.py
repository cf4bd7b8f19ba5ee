"""train_distance.py (a learned distance trained on fixed embeddings) and eval.py --distance, end to end on
generated clustered embeddings in embed.py's formats and on a tiny real checkpoint."""

import json
import os

import h5py
import kaldiio
import numpy as np
import pytest
import torch
from tiny_data import write_checkpoint, write_kaldi_dir

import eval as eval_script
import train_distance
from e2e_verification import backends
from e2e_verification.calibration import read_score_file
from e2e_verification.metrics import compute_eer
from models.verifier import PAIR_FEATURES, LearnedDistance
from utils import UserError, cli

CPU = ["--device", "cpu"]
FAST = ["--hidden-size", "32", "--batch-size", "40", "--samples-per-class", "4", *CPU]
OTHER_MODEL = {"checkpoint": "/elsewhere/other.pt", "weights_sha256": "0123456789abcdef", "model": "TDNN"}


def clusters(classes, per_class, dim, seed=0, spread=0.7):
    """Gaussian clusters: ({utt: class}, {utt: vector}), centres N(0, 1), items centre + spread * N(0, 1)."""
    rng = np.random.default_rng(seed)
    utt2spk, vectors = {}, {}
    for c in range(classes):
        centre = rng.normal(size=dim)
        for u in range(per_class):
            utt = f"s{seed}c{c:03d}-{u:02d}"
            utt2spk[utt] = f"s{seed}c{c:03d}"
            vectors[utt] = (centre + spread * rng.normal(size=dim)).astype(np.float32)
    return utt2spk, vectors


def write_embeddings(folder, utt2spk, vectors, labelled=True, provenance=None):
    """embeddings.h5 (with `spk` attributes), embeddings.ark/scp and utt2spk, as embed.py writes them."""
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, "embeddings.h5"), "w") as h5:
        h5.attrs["embedding_size"] = len(next(iter(vectors.values())))
        if provenance is not None:
            h5.attrs["provenance"] = json.dumps(provenance)
        for utt, vec in vectors.items():
            dataset = h5.create_dataset(utt, data=vec)
            if labelled and utt in utt2spk:
                dataset.attrs["spk"] = utt2spk[utt]
    ark, scp = os.path.join(folder, "embeddings.ark"), os.path.join(folder, "embeddings.scp")
    with kaldiio.WriteHelper(f"ark,scp:{ark},{scp}") as writer:
        for utt, vec in vectors.items():
            writer(utt, vec)
    with open(os.path.join(folder, "utt2spk"), "w") as handle:
        handle.writelines(f"{utt} {spk}\n" for utt, spk in utt2spk.items())
    return os.path.join(folder, "embeddings.h5")


def pair_eer(distance, utt2spk, vectors):
    """EER of the distance's logit over all pairs of the items."""
    emb = torch.from_numpy(np.stack(list(vectors.values())))
    labels = np.array([utt2spk[u] for u in vectors])
    a, b = torch.triu_indices(len(emb), len(emb), 1)
    with torch.no_grad():
        logits = distance.eval().pair_logits(emb, a, b).mean(0)
    return compute_eer(logits.numpy(), labels[a.numpy()] == labels[b.numpy()])


def test_held_out_classes_are_told_apart_far_better_than_chance(tmp_path, capsys):
    utt2spk, vectors = clusters(100, 8, 32)
    h5 = write_embeddings(tmp_path / "train", utt2spk, vectors)
    out = str(tmp_path / "distance.pt")
    argv = ["--embeddings", h5, "--out", out, "--steps", "300", "--valid-classes", "0.2", "--valid-every", "100"]
    assert train_distance.main([*argv, *FAST, "--hidden-size", "128", "--lr", "0.003"]) == 0
    printed = capsys.readouterr().out
    assert "800 embeddings of 32 dimensions from 100 classes, 20 held out" in printed
    found = backends.load_distance(out)
    history = found.training["history"]
    assert [check["step"] for check in history] == [0, 100, 200, 300] and found.training["steps"] == 300
    assert found.training["valid_eer"] == min(check["valid_eer"] for check in history) < 0.15
    new_classes = clusters(10, 10, 32, seed=1)  # classes neither trained on nor held out
    untrained = pair_eer(LearnedDistance(**found.config), *new_classes)
    trained = pair_eer(found.distance, *new_classes)
    assert trained < 0.15 and untrained > 0.3, (trained, untrained)  # chance is 0.5


@pytest.mark.parametrize("variant", list(PAIR_FEATURES))
def test_every_variant_saves_and_loads_weights_only(tmp_path, variant):
    utt2spk, vectors = clusters(6, 8, 16)
    h5 = write_embeddings(tmp_path, utt2spk, vectors, provenance=OTHER_MODEL)
    out = str(tmp_path / "distance.pt")
    argv = ["--embeddings", h5, "--out", out, "--steps", "3", "--pair-features", variant, "--ndiscriminators", "2"]
    assert train_distance.main([*argv, *FAST]) == 0
    state = torch.load(out, weights_only=True)
    assert state["format"] == backends.DISTANCE_FORMAT and state["provenance"] == OTHER_MODEL
    found = backends.load_distance(out)
    assert found.config["pair_features"] == variant and found.config["emb_size"] == 16
    assert found.training["args"]["pair_features"] == variant and found.training["classes"] == 6
    for name, tensor in found.distance.state_dict().items():
        assert torch.equal(tensor, state["weights"][name]), name
    again = tmp_path / "again.pt"
    backends.save_distance(again, found.distance, found.config, found.provenance, found.training)
    emb = torch.from_numpy(np.stack(list(vectors.values())))
    a, b = torch.triu_indices(len(emb), len(emb), 1)
    with torch.no_grad():
        want = found.distance.pair_logits(emb, a, b)
        assert torch.equal(backends.load_distance(again).distance.pair_logits(emb, a, b), want)


def test_scp_with_utt2spk_trains_the_same_distance_as_hdf5(tmp_path):
    utt2spk, vectors = clusters(8, 6, 12)
    write_embeddings(tmp_path, utt2spk, vectors)
    common = ["--steps", "20", *FAST]
    scp = ["--embeddings", str(tmp_path / "embeddings.scp"), "--utt2spk", str(tmp_path / "utt2spk")]
    assert train_distance.main([*scp, "--out", str(tmp_path / "a.pt"), *common]) == 0
    assert train_distance.main(["--embeddings", str(tmp_path), "--out", str(tmp_path / "b.pt"), *common]) == 0
    a, b = (backends.load_distance(tmp_path / name).distance.state_dict() for name in ("a.pt", "b.pt"))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def nuisance_clusters(classes, per_class, seed=0):
    """Classes that differ in 4 of 16 dimensions, with a larger nuisance in the other 12: the cosine ranks their
    pairs poorly and a learned distance can learn to look at the 4 that matter. -> ({utt: class}, {utt: vector})."""
    rng = np.random.default_rng(seed)
    utt2spk, vectors = {}, {}
    for c in range(classes):
        centre = np.concatenate([3 * rng.normal(size=4), np.zeros(12)])
        for u in range(per_class):
            utt = f"n{seed}c{c:03d}-{u:02d}"
            utt2spk[utt] = f"n{seed}c{c:03d}"
            noise = np.concatenate([0.5 * rng.normal(size=4), 2.5 * rng.normal(size=12)])
            vectors[utt] = (centre + noise).astype(np.float32)
    return utt2spk, vectors


def held_out_run(tmp_path, variant, train_labels="true", seed=0, data=None, n_train=40, extra=()):
    """train_distance.py on the first n_train of 50 classes (`data`, default clustered; their labels shuffled
    with train_labels="shuffled") with --valid-embeddings of the other classes, of the same model: -> (record,
    distance, held-out set)."""
    utt2spk, vectors = data or clusters(50, 8, 16, seed=seed)
    names = sorted(set(utt2spk.values()))
    train_ids = [u for u in vectors if utt2spk[u] in names[:n_train]]
    labels = [utt2spk[u] for u in train_ids]
    if train_labels == "shuffled":
        labels = [str(label) for label in np.random.default_rng(5).permutation(labels)]
    held = {u: utt2spk[u] for u in vectors if utt2spk[u] in names[n_train:]}
    model = {**OTHER_MODEL, "weights_sha256": "00000000000000aa"}
    train = write_embeddings(tmp_path / "train", dict(zip(train_ids, labels)), {u: vectors[u] for u in train_ids},
                             provenance=model)  # fmt: skip
    valid = write_embeddings(tmp_path / "valid", held, {u: vectors[u] for u in held}, provenance=model)
    out = str(tmp_path / f"{variant}.pt")
    argv = ["--embeddings", train, "--valid-embeddings", valid, "--out", out, "--pair-features", variant]
    steps = ["--steps", "200", "--valid-every", "50", "--patience", "0"]
    assert train_distance.main([*argv, *steps, *FAST, *extra]) == 0
    found = backends.load_distance(out)
    return found.training, found.distance, (held, {u: vectors[u] for u in held})


def test_held_out_embeddings_choose_the_step_and_report_the_cosine_beside(tmp_path, capsys):
    record, distance, held = held_out_run(tmp_path, "concat")
    printed = capsys.readouterr().out
    assert [check["step"] for check in record["history"]] == [0, 50, 100, 150, 200]
    assert record["valid_eer"] == min(check["valid_eer"] for check in record["history"][1:])  # trained checks
    assert 0 < record["best_step"] and record["valid_eer"] < record["history"][0]["valid_eer"]
    assert f"held-out EER {record['valid_eer']:.4f} at step {record['best_step']}" in printed
    assert f"(cosine {record['valid_cos_eer']:.4f}; the distance below it in " in printed
    assert 0 <= record["valid_confidence"] <= 1 and f"{100 * record['valid_confidence']:.0f}% of 1000" in printed
    assert abs(pair_eer(distance, *held) - record["valid_eer"]) < 1e-6  # the kept weights are the best check's
    # the held-out cosine EER is the cosine of those very pairs
    utt2spk, vectors = held
    emb = np.stack(list(vectors.values()))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    a, b = np.triu_indices(len(emb), 1)
    labels = np.array([utt2spk[u] for u in vectors])
    want = compute_eer((unit[a] * unit[b]).sum(1), labels[a] == labels[b])
    assert abs(record["valid_cos_eer"] - want) < 1e-6


def test_a_cos_distance_that_training_cannot_improve_falls_back_to_its_cosine(tmp_path, capsys):
    # shuffled training labels teach a correction that is noise; the held-out classes' cosine is already the
    # best ranking the untrained head (an affine map of the cosine) gives, so the check before training wins
    record, distance, (utt2spk, vectors) = held_out_run(tmp_path, "cos", train_labels="shuffled")
    assert "training never beat the untrained distance there" in capsys.readouterr().out
    assert record["best_step"] == 0 and record["valid_eer"] == record["history"][0]["valid_eer"]
    assert any(check["valid_eer"] > record["valid_eer"] for check in record["history"][1:])  # training did move it
    emb = torch.from_numpy(np.stack(list(vectors.values())))
    a, b = torch.triu_indices(len(emb), len(emb), 1)
    with torch.no_grad():
        logits = distance.eval().pair_logits(emb, a, b).mean(0)
    cos = torch.nn.functional.cosine_similarity(emb[a], emb[b])
    head = distance.heads[0]
    torch.testing.assert_close(logits, head.scale * cos + head.offset, atol=1e-5, rtol=1e-5)
    assert not head.rest[-1].weight.any()  # the correction's last layer is still the zeros it started as


def test_a_cos_distance_keeps_its_correction_only_when_the_held_out_classes_are_sure(tmp_path, capsys):
    data = nuisance_clusters(60, 8)
    fast = ["--lr", "0.003", "--hidden-size", "64"]
    # 20 held-out classes: the learned correction beats the cosine on them, surely
    record, distance, (utt2spk, vectors) = held_out_run(tmp_path / "many", "cos", data=data, extra=fast)
    assert record["best_step"] > 0 and "fell_back" not in record, record
    assert record["valid_confidence"] >= 0.95 and record["valid_eer"] < record["valid_cos_eer"] - 0.02
    assert distance.heads[0].rest[-1].weight.any()
    # 2 held-out classes, the same training: never sure enough, so the distance stays the cosine's affine map
    record, distance, (utt2spk, vectors) = held_out_run(tmp_path / "two", "cos", data=data, n_train=58, extra=fast)
    assert record["valid_confidence"] <= 0.5 and record["fell_back"] and record["best_step"] == 0, record
    assert "under --min-confidence 0.95, the untrained distance (the cosine) is kept" in capsys.readouterr().out
    assert not distance.heads[0].rest[-1].weight.any()
    # --min-confidence 0 keeps the best check
    record, distance, _ = held_out_run(
        tmp_path / "zero", "cos", data=data, n_train=58, extra=[*fast, "--min-confidence", "0"]
    )
    assert "fell_back" not in record and (record["best_step"] == 0 or distance.heads[0].rest[-1].weight.any())


def test_auto_keeps_the_variant_the_held_out_classes_choose_else_the_cosine(tmp_path, capsys):
    data = nuisance_clusters(60, 8)
    fast = ["--lr", "0.003", "--hidden-size", "64"]
    record, distance, _ = held_out_run(tmp_path / "many", "auto", data=data, extra=fast)
    candidates = record["candidates"]
    assert set(candidates) == {"sym", "cos"}
    want = min(candidates, key=lambda v: candidates[v]["valid_eer"])  # both are sure on 20 held-out classes
    assert all(c["valid_confidence"] >= 0.95 for c in candidates.values()), candidates
    assert distance.pair_features == want and record["valid_eer"] == candidates[want]["valid_eer"]
    assert f"the held-out choice: {want} distance: wrote" in capsys.readouterr().out
    # 2 held-out classes: neither can be sure, so the cos distance, fallen back to the cosine's map
    record, distance, _ = held_out_run(tmp_path / "two", "auto", data=data, n_train=58, extra=fast)
    assert distance.pair_features == "cos" and record["fell_back"] and not distance.heads[0].rest[-1].weight.any()
    assert "the held-out choice: cos distance: wrote" in capsys.readouterr().out


def test_weighted_eer_counts_a_pair_as_often_as_its_weight():
    rng = np.random.default_rng(3)
    scores, same = rng.normal(size=400), rng.random(400) < 0.3
    scores[same] += 1.0
    order = np.argsort(scores)
    weights = rng.integers(1, 4, size=400)
    repeated = np.repeat(np.arange(400), weights)
    want = compute_eer(scores[repeated], same[repeated])
    got = train_distance.weighted_eer(same[order], weights[order].astype(float))
    assert abs(got - want) < 0.01, (got, want)
    assert np.isnan(train_distance.weighted_eer(same[order], np.where(same, 0.0, 1.0)[order]))


def bad_input(tmp_path, case):
    """The argv of each bad input (its files written)."""
    utt2spk, vectors = clusters(4, 6, 8)
    h5 = write_embeddings(tmp_path / "ok", utt2spk, vectors)
    out = ["--out", str(tmp_path / "distance.pt")]
    if case == "one class":
        one = {utt: "c0" for utt in utt2spk}
        return ["--embeddings", write_embeddings(tmp_path / "one", one, vectors), *out]
    if case == "mixed sizes":
        vectors[next(iter(vectors))] = np.zeros(5, np.float32)
    elif case == "nan":
        vectors[next(iter(vectors))][3] = np.nan
    elif case == "labels missing":
        utt2spk.pop(next(iter(utt2spk)))
    if case.startswith("held-out"):
        ours = {**OTHER_MODEL, "weights_sha256": "00000000000000aa"}
        theirs = ours if case != "held-out of another model" else OTHER_MODEL
        others = clusters(3, 4, 8 if case != "held-out of another size" else 6, seed=9)[1]
        held = {u: ("c-shared" if case == "held-out shares a class" else f"v{k % 3}") for k, u in enumerate(others)}
        first = next(iter(utt2spk))
        if case == "held-out shares a class":
            utt2spk[first] = "c-shared"
        train = write_embeddings(tmp_path / "train", utt2spk, vectors, provenance=ours)
        valid = write_embeddings(tmp_path / "held", held, others, provenance=theirs)
        return ["--embeddings", train, *out, "--valid-embeddings", valid]
    bad = write_embeddings(tmp_path / "bad", utt2spk, vectors) if case != "unknown variant" else h5
    extra = {
        "held out twice": ["--valid-classes", "2", "--valid-embeddings", h5],
        "auto without held-out classes": ["--pair-features", "auto"],
        "unknown variant": ["--pair-features", "nope"],
        "steps and epochs": ["--steps", "5", "--epochs", "1"],
        "too many held out": ["--valid-classes", "3"],
    }.get(case, [])
    return ["--embeddings", bad, *out, *extra]


@pytest.mark.parametrize(
    "case, message",
    [
        ("one class", "one class"),
        ("mixed sizes", "do not all have the same size"),
        ("nan", "hold NaN or Inf"),
        ("labels missing", "have no `spk` attribute"),
        ("unknown variant", "invalid choice: 'nope'"),
        ("steps and epochs", "not both"),
        ("too many held out", "training needs 2"),
        ("held out twice", "not both"),
        ("auto without held-out classes", "chooses on held-out classes"),
        ("held-out of another model", "not with the model of --embeddings (/elsewhere/other.pt) (weights 0000000000"),
        ("held-out of another size", "embeddings of 6 dimensions, the training ones have 8"),
        ("held-out shares a class", "classes are training classes too"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, message):
    argv = bad_input(tmp_path, case)
    with pytest.raises(SystemExit) as info:
        cli(train_distance.main, [*argv, *FAST])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "distance.pt").exists()


def test_files_that_are_not_distance_files_are_refused(tmp_path):
    cp = write_checkpoint(str(tmp_path / "cp.pt"))
    (tmp_path / "text.pt").write_text("hello\n")
    with pytest.raises(UserError, match="a checkpoint"):
        backends.load_distance(cp)
    with pytest.raises(UserError, match="not a distance file"):
        backends.load_distance(tmp_path / "text.pt")


# ----------------------------------------------------------------------------- eval.py --distance


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A tiny ECAPA checkpoint (6-dimensional embeddings), test trials, and embed.py's training embeddings."""
    import embed

    root = tmp_path_factory.mktemp("eval_distance")
    kaldi, train = str(root / "kaldi"), str(root / "train")
    write_kaldi_dir(kaldi, n_speakers=4, n_utts=4, ncoef=23)
    write_kaldi_dir(train, n_speakers=8, n_utts=6, ncoef=23, seed=7, prefix="trn")
    small = {"ncoef": 23, "channels": 16, "embedding_size": 6, "latent_size": 8, "mfa_channels": 32}
    small.update(se_bottleneck=8, attention_bottleneck=8)
    cp = write_checkpoint(str(root / "ecapa.pt"), "ECAPA_TDNN", 4, small)
    for source, folder in ((train, "train_emb"), (kaldi, "test_emb")):
        argv = ["--data", source, "--cp-path", cp, "--out-path", str(root / folder), "--min-frames", "100"]
        assert embed.main([*argv, *CPU]) == 0  # eval.py's tiling, so the test embeddings are the same
    return kaldi, cp, root


def eval_argv(speech, out, *extra):
    kaldi, cp, _ = speech
    return ["--cp-path", cp, "--test-data", kaldi, "--trials-path", kaldi + "/trials", "--out-path", out, *CPU, *extra]


def test_eval_scores_trials_with_the_trained_distance(speech, tmp_path, capsys):
    _, _, root = speech
    model_path = str(tmp_path / "distance.pt")
    argv = ["--embeddings", str(root / "train_emb"), "--out", model_path, "--steps", "10", "--pair-features", "sym"]
    assert train_distance.main([*argv, *FAST]) == 0
    out = str(tmp_path / "scores.out")
    assert eval_script.main(eval_argv(speech, out, "--distance", model_path)) == 0
    summary = json.load(open(out + ".json"))
    assert summary["scorers"]["dist"]["is_llr"] and "eer" in summary["metrics"]["dist"]
    assert "dist" in [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    columns, _, enroll, test = read_score_file(out)
    with h5py.File(root / "test_emb" / "embeddings.h5", "r") as h5:
        vectors = {u: torch.from_numpy(h5[u][()]) for u in h5}
    distance = backends.load_distance(model_path).distance
    with torch.no_grad():
        want = distance(torch.stack([vectors[u] for u in enroll]), torch.stack([vectors[u] for u in test])).mean(0)
    np.testing.assert_allclose(columns["dist"], want.numpy(), rtol=1e-4, atol=1e-4)
    # dist_fus: the research code's fusion of that distance's probability with the cosine of the same pair
    cos = torch.nn.functional.cosine_similarity(
        torch.stack([vectors[u] for u in enroll]), torch.stack([vectors[u] for u in test])
    )
    fused = 0.5 * (torch.sigmoid(want) + 0.5 * (cos + 1))
    np.testing.assert_allclose(columns["dist_fus"], fused.numpy(), rtol=1e-4, atol=1e-4)
    assert not summary["scorers"]["dist_fus"]["is_llr"] and "eer" in summary["metrics"]["dist_fus"]


def test_eval_refuses_a_distance_of_another_model_or_size(speech, tmp_path, capsys):
    for name, dim, provenance in (("other.pt", 6, OTHER_MODEL), ("wide.pt", 9, None)):
        utt2spk, vectors = clusters(4, 6, dim)
        h5 = write_embeddings(tmp_path / name[:-3], utt2spk, vectors, provenance=provenance)
        assert train_distance.main(["--embeddings", h5, "--out", str(tmp_path / name), "--steps", "2", *FAST]) == 0
    out = str(tmp_path / "scores.out")
    with pytest.raises(UserError, match="made with /elsewhere/other.pt.*--allow-other-model"):
        eval_script.main(eval_argv(speech, out, "--distance", str(tmp_path / "other.pt")))
    with pytest.raises(UserError, match="embeddings of size 9; the checkpoint's are 6"):
        eval_script.main(eval_argv(speech, out, "--distance", str(tmp_path / "wide.pt")))
    assert not os.path.exists(out)
    capsys.readouterr()
    argv = eval_argv(speech, out, "--distance", str(tmp_path / "other.pt"), "--allow-other-model")
    assert eval_script.main(argv) == 0
    assert "used anyway (--allow-other-model)" in capsys.readouterr().err
    assert "dist" in read_score_file(out)[0]


# ----------------------------------------------------------------------------- experiments/distance_backend.py


def test_experiment_smoke_trains_and_scores_every_backend(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    import distance_backend

    train = write_embeddings(tmp_path / "train", *clusters(16, 8, 12))
    test = write_embeddings(tmp_path / "test", *clusters(5, 6, 12, seed=3))
    out = str(tmp_path / "table.md")
    argv = ["--train", train, "--test", test, "--variants", "sym", "--steps", "20", "--valid-classes", "4"]
    assert distance_backend.main([*argv, "--work-dir", str(tmp_path / "work"), "--threads", "1", "--out", out]) == 0
    results = json.load(open(tmp_path / "table.json"))["runs"]
    assert set(results) == {"cos", "plda", "dist_sym", "fus_sym"} and "cllr" in results["dist_sym"]
    assert 0 <= results["fus_sym"]["eer"] <= 0.5
    assert results["cos"]["eer"] < 0.1 and "| dist_sym |" in open(out).read()


# ----------------------------------------------------------------------------- experiments/backend_study.py


def test_backend_study_embeds_a_kept_speech_run_and_scores_its_fold(tmp_path, monkeypatch):
    """A kept Asterisk-layout run (accuracy.py --keep-dir, a fold's train.hdf, test features and trials): the
    study embeds with the run's chosen epoch (embed.py) and reports cosine, PLDA and the distance on the trials."""
    from tests.tiny_data import write_checkpoint, write_kaldi_dir, write_speaker_hdf5

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    import backend_study

    cp = tmp_path / "keep" / "asterisk_concat_3" / "cp"
    cp.mkdir(parents=True)
    tdnn = {"ncoef": 30, "latent_size": 16}
    for epoch in (1, 2):
        write_checkpoint(str(cp / f"checkpoint_{epoch}ep.pt"), "TDNN", 6, tdnn, seed=epoch)
    fold = tmp_path / "data" / "asterisk_fold3"
    fold.mkdir(parents=True)
    write_speaker_hdf5(str(fold / "train.hdf"), {f"spk{k}": 8 for k in range(6)}, frames=60)
    write_kaldi_dir(str(fold / "test_feats"), n_speakers=3, n_utts=3, frames=(60, 80))
    (fold / "test").mkdir()
    os.replace(fold / "test_feats" / "trials", fold / "test" / "trials")
    out = tmp_path / "study.md"
    argv = ["--keep-dir", str(tmp_path / "keep"), "--protocols", "asterisk", "--asterisk-dir", str(tmp_path / "data")]
    argv += [
        "--variants",
        "cos",
        "--steps",
        "20",
        "--valid-classes",
        "2",
        "--lda-dim",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert backend_study.main(argv) == 0
    record = json.load(open(tmp_path / "study.json"))
    (run,) = record["runs"]
    assert run["set"] == "fold 3" and run["checkpoint"].endswith("checkpoint_2ep.pt")  # no validation: the last
    assert (
        set(run["results"]) == {"cos", "plda", "dist_cos", "fus_cos"}
        and run["results"]["dist_cos"]["train_seconds"] > 0
    )
    assert "LDA needs more items than classes + dimensions" in run["results"]["plda"]["failed"]  # 48 items, 512-d
    assert (
        "| asterisk | dist_cos | 1 |" in out.read_text()
        and "| asterisk | plda | 1 | not trained on 1 |" in out.read_text()
    )
    with h5py.File(cp.parent / "backends" / "train_emb" / "embeddings.h5") as h5:
        assert len(h5) == 48 and json.loads(h5.attrs["provenance"])["checkpoint"].endswith("checkpoint_2ep.pt")


def test_backend_study_holds_out_a_digits_runs_validation_classes(tmp_path, monkeypatch):
    """--held-out valid on a kept digits-open run: the validation digits 5-6 are embedded with the run's checkpoint
    and choose each distance's step (train_distance.py --valid-embeddings); training digits 0-4, test 7-9."""
    from tests.tiny_data import write_checkpoint

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    import backend_study

    cp = tmp_path / "keep" / "digits-open_cos_2" / "cp"
    cp.mkdir(parents=True)
    write_checkpoint(str(cp / "checkpoint_1ep.pt"), "resnet", 5, {"in_channels": 1, "stem": "cifar", "width": 8})
    out = tmp_path / "study.md"
    argv = ["--keep-dir", str(tmp_path / "keep"), "--protocols", "digits-open", "--variant", "cos", "--variants"]
    argv += ["cos", "--steps", "30", "--held-out", "valid", "--lda-dim", "4", "--threads", "1", "--out", str(out)]
    assert backend_study.main(argv) == 0
    (run,) = json.load(open(tmp_path / "study.json"))["runs"]
    found = run["results"]["dist_cos"]
    assert run["set"] == "seed 2" and {"valid_eer", "valid_cos_eer", "best_step"} <= set(found)
    assert found["valid_eer"] <= found["valid_cos_eer"] + 1e-9  # the untrained cos head ranks as the cosine does
    backends_dir = cp.parent / "backends"
    for part, digits in (("train_emb", set("01234")), ("valid_emb", set("56")), ("test_emb", set("789"))):
        with h5py.File(backends_dir / part / "embeddings.h5") as h5:
            assert {h5[name].attrs["spk"] for name in h5} == digits, part
    distance = backends.load_distance(backends_dir / "held_out_valid" / "distance_cos.pt")
    assert distance.training["args"]["valid_embeddings"].endswith("valid_emb")
    page = out.read_text()
    assert "| digits-open | dist_cos | 1 |" in page and "| digits-open | held-out choice | 1 |" in page
    assert "| digits-open | held-out choice, fused | 1 |" in page
    assert f"Held-out choice: {backend_study.distance_backend.held_out_choice(run['results'])}." in page
    with pytest.raises(UserError, match="the asterisk runs have no validation classes"):
        backend_study.run_set(
            backend_study.build_parser().parse_args(argv), "asterisk", "fold 0", str(tmp_path / "none.pt"),
            {"train": ("x", []), "test": ("y", []), "valid": None, "trials": None},
        )  # fmt: skip


def test_the_held_out_choice_takes_the_best_held_out_distance_or_the_cosine(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    import distance_backend

    def results(sym, cos_head, cosine, sure=(0.99, 0.99)):
        held = {"valid_cos_eer": cosine}
        return {
            "cos": {"eer": 0.3},
            "plda": {"eer": 0.01},  # a test EER is never looked at
            "dist_sym": {"eer": 0.9, "valid_eer": sym, "valid_confidence": sure[0], **held},
            "dist_cos": {"eer": 0.1, "valid_eer": cos_head, "valid_confidence": sure[1], **held},
        }

    assert distance_backend.held_out_choice(results(0.20, 0.25, 0.30)) == "dist_sym"
    assert distance_backend.held_out_choice(results(0.26, 0.25, 0.30)) == "dist_cos"
    assert distance_backend.held_out_choice(results(0.31, 0.30, 0.30)) == "cos"  # none below the cosine: cosine
    assert distance_backend.held_out_choice(results(0.20, 0.25, 0.30, (0.9, 0.96))) == "dist_cos"  # sym not sure
    assert distance_backend.held_out_choice(results(0.20, 0.25, 0.30, (0.5, 0.5))) == "cos"
    assert distance_backend.held_out_choice(results(0.20, 0.25, 0.30, (0.5, 0.5)), min_confidence=0.5) == "dist_sym"
    assert distance_backend.held_out_choice({"cos": {"eer": 0.3}, "dist_sym": {"eer": 0.2}}) is None
    concat = {"eer": 0.01, "valid_eer": 0.01, "valid_cos_eer": 0.3, "valid_confidence": 1.0}
    assert distance_backend.held_out_choice({**results(0.20, 0.25, 0.30), "dist_concat": concat}) == "dist_sym"
