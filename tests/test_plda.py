"""PLDA against SpeechBrain's independent implementation, against the two Gaussians written out with scipy,
and its storage and error messages."""

import importlib.util
import json
import os

import numpy as np
import pytest
from scipy import stats

from e2e_verification.metrics import compute_eer
from e2e_verification.plda import PLDA
from utils import UserError

D = 16


def load_speechbrain_plda():
    """SpeechBrain's PLDA_LDA.py loaded as a file (the speechbrain package itself needs torchaudio)."""
    spec = importlib.util.find_spec("speechbrain")
    if spec is None:
        pytest.skip("speechbrain is not installed (pip install --no-deps speechbrain)")
    path = os.path.join(spec.submodule_search_locations[0], "processing", "PLDA_LDA.py")
    module_spec = importlib.util.spec_from_file_location("speechbrain_plda_lda", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def generate(rng, classes=30, per_class=10, dim=D, between_scale=2.0, unbalanced=False):
    """Gaussian class means plus correlated within-class noise -> (x (items, dim), labels); with `unbalanced`,
    class sizes vary from 2 to 2 * per_class."""
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    means = rng.normal(size=(classes, dim)) * between_scale
    counts = rng.integers(2, 2 * per_class + 1, classes) if unbalanced else np.full(classes, per_class)
    labels = np.arange(classes).repeat(counts)
    return means[labels] + rng.normal(size=(len(labels), dim)) @ mix, labels


def trials(rng, x, labels, count=2000):
    """Random trials over x: (enroll index, test index, target flags)."""
    a, b = rng.integers(0, len(x), count), rng.integers(0, len(x), count)
    keep = a != b
    return a[keep], b[keep], labels[a[keep]] == labels[b[keep]]


def speechbrain_scores(sb, train, labels, enroll, test, iterations=100):
    """SpeechBrain: full-rank PLDA (F F' = B, Sigma = W) trained by its EM, scored with fast_PLDA_scoring -> (E, M)."""

    def stat(x, models):
        none = np.array([None] * len(x))
        segs = np.array([f"seg{i:06d}" for i in range(len(x))], dtype="|O")
        return sb.StatObject_SB(np.array(models, dtype="|O"), segs, none, none, np.ones((len(x), 1)), x.copy())

    model = sb.PLDA(rank_f=train.shape[1], nb_iter=iterations)
    model.plda(stat(train, [f"spk{label:05d}" for label in labels]))
    # Fixed-width names: SpeechBrain's Ndx matches names by substring. Rows and columns keep the input order.
    enroll_stat = stat(enroll, [f"enr{i:06d}" for i in range(len(enroll))])
    test_stat = stat(test, [f"tst{i:06d}" for i in range(len(test))])
    ndx = sb.Ndx(models=enroll_stat.modelset, testsegs=test_stat.segset)
    out = sb.fast_PLDA_scoring(enroll_stat, test_stat, ndx, model.mean, model.F, model.Sigma, check_missing=False)
    return out.scoremat, model


@pytest.mark.parametrize("between_scale, unbalanced", [(2.0, False), (1.0, True)])
def test_same_estimator_and_scores_as_speechbrain(between_scale, unbalanced):
    """Both fit the full-rank two-covariance model by maximum likelihood (mean fixed at the data mean) with
    EM; after convergence B, W and every score agree to ~1e-9 relative, with equal or unequal class sizes
    and a strong or weaker class signal."""
    sb = load_speechbrain_plda()
    rng = np.random.default_rng(0)
    x, labels = generate(rng, classes=90, between_scale=between_scale, unbalanced=unbalanced)
    held_out, held_labels, x, labels = x[labels >= 70], labels[labels >= 70], x[labels < 70], labels[labels < 70]
    ours = PLDA(whiten=False, length_norm=False, tol=1e-12).fit(x, labels)
    # converged (with equal class sizes the moment start is the answer already); B has full rank here: where
    # the likelihood peaks at a singular B (few classes, weak signal), both EMs creep there slowly
    assert ours.iterations_run < 100
    theirs, model = speechbrain_scores(sb, x, labels, held_out, held_out)
    np.testing.assert_allclose(ours.between, model.F @ model.F.T, atol=1e-8 * np.abs(ours.between).max())
    np.testing.assert_allclose(ours.within, model.Sigma, atol=1e-8 * np.abs(ours.within).max())
    mine = ours.score_matrix(held_out, held_out)
    np.testing.assert_allclose(mine, theirs, rtol=1e-7, atol=1e-7 * np.abs(theirs).max())
    a, b, target = trials(rng, held_out, held_labels)
    np.testing.assert_allclose(ours.score(held_out[a], held_out[b]), theirs[a, b], rtol=1e-7, atol=1e-6)
    assert compute_eer(theirs[a, b], target) < 0.3  # the classes are separable enough for the check to mean something


def test_preprocessed_scores_match_speechbrain():
    """With LDA and length normalisation on, SpeechBrain's PLDA trained on our preprocessed vectors scores
    the same trials with the same values (rank correlation 1, equal EER)."""
    sb = load_speechbrain_plda()
    rng = np.random.default_rng(2)
    x, labels = generate(rng, classes=50, between_scale=0.7)
    held_out, held_labels, x, labels = x[labels >= 30], labels[labels >= 30], x[labels < 30], labels[labels < 30]
    ours = PLDA(lda_dim=10, tol=1e-12).fit(x, labels)
    a, b, target = trials(rng, held_out, held_labels)
    pre = ours.preprocess(held_out)
    theirs, _ = speechbrain_scores(sb, ours.preprocess(x), labels, pre, pre)
    mine = ours.score(held_out[a], held_out[b])
    np.testing.assert_allclose(mine, theirs[a, b], rtol=1e-7, atol=1e-7 * np.abs(mine).max())
    assert stats.spearmanr(mine, theirs[a, b]).statistic > 0.9999
    assert compute_eer(mine, target) == compute_eer(theirs[a, b], target)


def random_covariances(rng, dim):
    """A hand-set model: mean (dim,), B and W (dim, dim) positive definite, B of rank dim - 1 plus a ridge."""
    f = rng.normal(size=(dim, dim - 1))
    g = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), f @ f.T + 0.01 * np.eye(dim), g @ g.T / dim + 0.1 * np.eye(dim)


def test_llr_equals_the_two_gaussians():
    """score(x, y) = log N([x; y]; [mu; mu], [[B+W, B], [B, B+W]]) - log N([x; y]; [mu; mu], diag(B+W, B+W))."""
    rng = np.random.default_rng(4)
    dim = 5
    mean, between, within = random_covariances(rng, dim)
    model = PLDA().from_covariances(mean, between, within)
    total = between + within
    same = np.block([[total, between], [between, total]])
    diff = np.block([[total, np.zeros((dim, dim))], [np.zeros((dim, dim)), total]])
    x, y = rng.normal(size=(50, dim)) * 2 + mean, rng.normal(size=(50, dim)) * 2 + mean
    pairs = np.hstack([x, y])
    mu2 = np.concatenate([mean, mean])
    expected = stats.multivariate_normal(mu2, same).logpdf(pairs) - stats.multivariate_normal(mu2, diff).logpdf(pairs)
    np.testing.assert_allclose(model.score(x, y), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model.score_matrix(x, y).diagonal(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model.score_matrix(x[:3], y)[2], model.score(x[[2] * 50], y), rtol=1e-12)
    np.testing.assert_allclose(model.score_projected(model.project(x), model.project(y)), expected, rtol=1e-10)


def test_multi_item_enrollment_is_the_exact_llr():
    """n enrollment items averaged (Kaldi's --num-utts scoring) give log p(x1..xn, y | one class) -
    log p(x1..xn | one class) p(y), each written as one joint Gaussian."""
    rng = np.random.default_rng(5)
    dim, n = 4, 3
    mean, between, within = random_covariances(rng, dim)
    model = PLDA().from_covariances(mean, between, within)

    def joint(k):  # covariance of k items of one class, stacked
        return np.kron(np.ones((k, k)), between) + np.kron(np.eye(k), within)

    groups = [rng.normal(size=(n, dim)) + mean for _ in range(4)]
    test = rng.normal(size=(6, dim)) + mean
    got = model.score_models(groups, test)
    for e, items in enumerate(groups):
        for t, y in enumerate(test):
            together = stats.multivariate_normal(np.tile(mean, n + 1), joint(n + 1)).logpdf(np.concatenate([*items, y]))
            apart = stats.multivariate_normal(np.tile(mean, n), joint(n)).logpdf(items.ravel())
            apart += stats.multivariate_normal(mean, between + within).logpdf(y)
            assert got[e, t] == pytest.approx(together - apart, rel=1e-9, abs=1e-9)
    # one item per model is the plain trial score
    np.testing.assert_allclose(
        model.score_models([g[:1] for g in groups], test)[:, 0],
        model.score(np.stack([g[0] for g in groups]), test[[0] * 4]),
        rtol=1e-12,
    )


def test_lda_whitens_within_class_and_diagonalises_between():
    rng = np.random.default_rng(6)
    x, labels = generate(rng)
    model = PLDA(lda_dim=6, length_norm=False).fit(x, labels)
    z = model.preprocess(x)
    assert z.shape == (len(x), 6)
    means = np.stack([z[labels == c].mean(0) for c in range(30)])
    within = sum((z[labels == c] - means[c]).T @ (z[labels == c] - means[c]) for c in range(30)) / len(z)
    np.testing.assert_allclose(within, np.eye(6), atol=1e-10)
    between = (means - z.mean(0)).T @ (means - z.mean(0)) / 30
    off = between - np.diag(between.diagonal())
    assert np.abs(off).max() < 1e-10 and (np.diff(between.diagonal()) <= 1e-12).all()
    norms = np.linalg.norm(PLDA(lda_dim=6).fit(x, labels).preprocess(x), axis=1)
    np.testing.assert_allclose(norms, np.sqrt(6))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x, labels = generate(rng)
    model = PLDA(lda_dim=8).fit(x.astype(np.float32), labels)
    path = tmp_path / "plda.json"
    model.save(path)
    state = json.loads(path.read_text())  # plain JSON, no pickle
    assert state["lda_dim"] == 8 and len(state["between"]) == 8
    loaded = PLDA.load(path)
    np.testing.assert_array_equal(loaded.score_matrix(x[:20], x[20:40]), model.score_matrix(x[:20], x[20:40]))
    assert [p.name for p in tmp_path.iterdir()] == ["plda.json"]  # no temporary left behind


@pytest.mark.parametrize(
    "case, message",
    [
        ("one class", "at least 2 classes"),
        ("lda too large", "needs more than 8 classes"),
        ("nan", "NaN or inf"),
        ("dim mismatch", "the PLDA model expects 16"),
        ("label count", "labels"),
        ("unfitted", "not trained"),
        ("too few items", "more items than classes"),
    ],
)
def test_bad_input_is_one_clear_line(case, message):
    rng = np.random.default_rng(8)
    x, labels = generate(rng, classes=8, per_class=4)
    with pytest.raises(UserError, match=message) as info:
        if case == "one class":
            PLDA().fit(x, np.zeros(len(x)))
        elif case == "lda too large":
            PLDA(lda_dim=8).fit(x, labels)
        elif case == "nan":
            x[3, 2] = np.nan
            PLDA().fit(x, labels)
        elif case == "dim mismatch":
            PLDA().fit(x, labels).score(x[:2, :8], x[:2, :8])
        elif case == "label count":
            PLDA().fit(x, labels[:-1])
        elif case == "unfitted":
            PLDA().score(x[:2], x[:2])
        elif case == "too few items":
            PLDA(whiten=False).fit(x[:20], labels[:20])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["not json", '{"format": "other"}', '{"format": "e2e-plda-1", "dim": 2}'])
def test_bad_model_files(tmp_path, content):
    path = tmp_path / "plda.json"
    path.write_text(content)
    with pytest.raises(UserError, match="plda.json"):
        PLDA.load(path)
    with pytest.raises(UserError, match="not found"):
        PLDA.load(tmp_path / "missing.json")
