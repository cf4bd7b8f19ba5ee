"""Two-covariance PLDA back-end for fixed embeddings (Kaldi's ivector-compute-plda / ivector-plda-scoring).

Pipeline, every step fitted on the training embeddings (N, d) with their class labels:
  1. centre on the training mean;
  2. a linear transform: LDA to `lda_dim` (the generalised eigenvectors of between- vs within-class
     scatter, scaled so the within-class covariance becomes the identity, as Kaldi's ivector-compute-lda),
     or without LDA, whitening with the total covariance when `whiten` (the default), or nothing;
  3. length normalisation when `length_norm` (the default): each vector scaled to norm sqrt(dim), as
     Kaldi's ivector-normalize-length;
  4. the two-covariance model: class variable y ~ N(mu, B), item x = y + e with e ~ N(0, W), B and W
     full, estimated by maximum likelihood with EM. mu is fixed at the mean of the training data (as in
     Kaldi's PldaEstimator). The start is the moment estimate (W from the within-class scatter, B from
     the class means' covariance less W / n), already the maximum-likelihood answer when every class has
     the same number of items; each M-step adds the parameter-expanded ("minimum divergence") update of
     SIDEKIT / SpeechBrain, which converges in tens of iterations where plain EM can need thousands. EM
     steps work in the basis that diagonalises both (T W T' = I, T B T' = diag(psi)), where the class
     posteriors of every class size are diagonal (no matrix inverse per class).

Scoring is the closed-form log-likelihood ratio
    log N([x; y]; same class) - log N([x; y]; different classes)
computed in that basis, where it is a sum of d one-dimensional terms. An enrollment of n items is
scored as Kaldi's ivector-plda-scoring with --num-utts does: the items are preprocessed one by one
(steps 1-3), averaged, and scored with the n-item predictive distribution
    y | n items ~ N(n psi / (n psi + 1) * mean, 1 + psi / (n psi + 1)),
which is the exact LLR of the model for n enrollment items and one test item (not a single-item
score of the mean). Kaldi's second length normalisation inside ivector-plda-scoring is not done.

Models are saved as JSON (plain numbers, no pickle) with `save` / `PLDA.load`.
"""

import json
import math

import numpy as np

from utils import UserError, atomic_write

FORMAT = "e2e-plda-1"


def _as_matrix(x, name, dim=None):
    """x -> float64 (N, dim) array; UserError for a wrong shape, NaN or inf."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1 and dim is not None and x.shape[0] == dim:
        x = x[None]
    if x.ndim != 2:
        raise UserError(f"{name}: expected a 2-D (items, dim) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise UserError(f"{name}: embeddings have {x.shape[1]} dimensions, the PLDA model expects {dim}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise UserError(f"{name}: {bad} embedding(s) hold NaN or inf values")
    return x


def _class_stats(x, labels):
    """x (N, d), labels (N,) -> (class means (S, d), counts (S,), within-class scatter (d, d), class index (N,))."""
    _, index, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(sums, index, x)
    means = sums / counts[:, None]
    resid = x - means[index]
    return means, counts, resid.T @ resid, index


def _inverse_sqrt(cov, what):
    """Symmetric positive definite cov (d, d) -> cov^(-1/2) as a (d, d) matrix P with P cov P' = I."""
    values, vectors = np.linalg.eigh(cov)
    if values[0] <= 1e-10 * max(values[-1], 1e-300):
        raise UserError(f"the {what} covariance of the training embeddings is singular; use fewer dimensions")
    return (vectors / np.sqrt(values)).T


def simultaneous_diagonalisation(between, within):
    """(B, W) (d, d) -> (T (d, d), psi (d,)) with T W T' = I and T B T' = diag(psi), psi descending."""
    chol = np.linalg.cholesky(within)
    chol_inv = np.linalg.inv(chol)
    psi, vectors = np.linalg.eigh(chol_inv @ between @ chol_inv.T)
    order = np.argsort(psi)[::-1]
    return vectors[:, order].T @ chol_inv, np.clip(psi[order], 0.0, None)


class PLDA:
    """Two-covariance PLDA with optional LDA, whitening and length normalisation (see the module doc).

    lda_dim: LDA output size (None: no LDA); whiten: without LDA, whiten with the total covariance;
    length_norm: scale preprocessed vectors to norm sqrt(dim); iterations / tol: EM stops after this
    many steps or when no entry of W (in units of W) or of B (relative to its largest eigenvalue) moves by
    more than tol. Where the likelihood peaks at a singular B (few classes for the dimension, weak
    directions) EM creeps towards it for hundreds of steps while the scores no longer move (measured: max
    score change < 1e-3 after the first step, score std 2.8): the default cap of 100 steps stops it.
    """

    def __init__(self, lda_dim=None, whiten=True, length_norm=True, iterations=100, tol=1e-6):
        if lda_dim is not None and lda_dim < 1:
            raise UserError(f"lda_dim must be >= 1, got {lda_dim}")
        self.lda_dim, self.whiten, self.length_norm = lda_dim, whiten, length_norm
        self.iterations, self.tol = iterations, tol
        self.dim = None  # input embedding size, set by fit / from_dict
        self.iterations_run = 0
        self.provenance = None  # the model that made the training embeddings (checkpoints.provenance_of)

    # ------------------------------------------------------------------ training

    def fit(self, embeddings, labels):
        """Fit the preprocessing and B, W on embeddings (N, d) with class labels (N,); returns self."""
        x = _as_matrix(embeddings, "training embeddings")
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise UserError(f"{len(x)} embeddings but {labels.shape} labels")
        n_classes = len(np.unique(labels))
        if n_classes < 2:
            raise UserError(f"PLDA needs at least 2 classes (speakers), got {n_classes}")
        if self.lda_dim is not None and self.lda_dim > x.shape[1]:
            raise UserError(f"lda_dim {self.lda_dim} is larger than the embedding size {x.shape[1]}")
        if self.lda_dim is not None and n_classes <= self.lda_dim:
            raise UserError(f"LDA to {self.lda_dim} dimensions needs more than {self.lda_dim} classes, got {n_classes}")
        self.dim = x.shape[1]
        self.center = x.mean(axis=0)
        self.transform = self._fit_transform(x - self.center, labels)
        z = self._length_normalise((x - self.center) @ self.transform.T)
        self.mu = z.mean(axis=0)
        self.between, self.within = self._fit_two_covariance(z - self.mu, labels)
        self._prepare()
        return self

    def _fit_transform(self, x, labels):
        """The (k, d) matrix of step 2: LDA rows, a whitening matrix, or the identity."""
        if self.lda_dim is None:
            return _inverse_sqrt(x.T @ x / len(x), "total") if self.whiten else np.eye(x.shape[1])
        means, counts, scatter, _ = _class_stats(x, labels)
        if len(x) - len(counts) < x.shape[1]:
            raise UserError(
                f"LDA needs more items than classes + dimensions: {len(x)} items, {len(counts)} classes, "
                f"{x.shape[1]} dimensions"
            )
        to_within = _inverse_sqrt(scatter / len(x), "within-class")
        between = to_within @ ((means.T * counts) @ means / len(x)) @ to_within.T
        values, vectors = np.linalg.eigh(between)
        return vectors[:, np.argsort(values)[::-1][: self.lda_dim]].T @ to_within

    def _length_normalise(self, z):
        if not self.length_norm:
            return z
        return z * (math.sqrt(z.shape[1]) / np.clip(np.linalg.norm(z, axis=1, keepdims=True), 1e-12, None))

    def _fit_two_covariance(self, z, labels):
        """EM for B, W on centred data z (N, k) -> (B, W) (k, k); each class variable's posterior is closed form."""
        means, counts, scatter, _ = _class_stats(z, labels)
        n_items, n_classes, k = len(z), len(counts), z.shape[1]
        if n_items - n_classes < k:
            raise UserError(
                f"the within-class covariance needs more items than classes + dimensions: {n_items} items, "
                f"{n_classes} classes, {k} dimensions (use a smaller lda_dim)"
            )
        within = scatter / (n_items - n_classes)
        if np.linalg.eigvalsh(within)[0] <= 1e-10 * np.abs(within).max():
            raise UserError("the within-class covariance of the training embeddings is singular")
        # Start from the moments: the class means' covariance is B + W / n for classes of n items (with equal
        # counts this start is already the maximum-likelihood answer); B's eigenvalues, in units of W, floored.
        t, psi = simultaneous_diagonalisation(means.T @ means / n_classes, within)
        a = np.linalg.inv(t)
        between = a @ np.diag(np.clip(psi - np.mean(1.0 / counts), 1e-4, None)) @ a.T
        total = scatter + (means.T * counts) @ means  # item scatter about the (zero) mean
        self.iterations_run = 0
        for _ in range(self.iterations):
            t, psi = simultaneous_diagonalisation(between, within)
            a = np.linalg.inv(t)  # back to the data basis: B = A diag(psi) A', W = A A'
            # E-step, in the diagonal basis: class variable posteriors N(n psi / (n psi + 1) u, psi / (n psi + 1))
            u = means @ t.T  # class means (S, k)
            post_var = psi / (counts[:, None] * psi + 1.0)
            y = counts[:, None] * post_var * u  # posterior means (S, k)
            cross = (u.T * counts) @ y  # sum over items of x E[y]'
            second = (y.T * counts) @ y + np.diag(counts @ post_var)  # sum over items of E[y y']
            # M-step with the parameter expansion x = R y + e (the minimum-divergence step of SpeechBrain's and
            # SIDEKIT's PLDA): R by regression, then B = R E[y y'] R' over classes, W the residual.
            loading = np.linalg.lstsq(second, cross.T, rcond=None)[0].T
            latent = (y.T @ y + np.diag(post_var.sum(0))) / n_classes
            new_between = a @ loading @ latent @ loading.T @ a.T
            new_within = (total - a @ loading @ cross.T @ a.T) / n_items
            # change in units of W (B's relative to its largest eigenvalue)
            step = max(
                np.abs(t @ (new_between - between) @ t.T).max() / (1.0 + psi[0]),
                np.abs(t @ (new_within - within) @ t.T).max(),
            )
            between, within = (new_between + new_between.T) / 2, (new_within + new_within.T) / 2
            self.iterations_run += 1
            if step < self.tol:
                break
        return between, within

    def _prepare(self):
        """Derived quantities for scoring: the diagonal basis T (k, k) and psi (k,)."""
        self.diag_transform, self.psi = simultaneous_diagonalisation(self.between, self.within)

    # ------------------------------------------------------------------ scoring

    def _check_fitted(self):
        if self.dim is None:
            raise UserError("the PLDA model is not trained: call fit() or load a model first")

    def preprocess(self, x, name="embeddings"):
        """Embeddings (N, d) -> the PLDA model's input space (N, k): centred, LDA / whitened, length-normalised."""
        self._check_fitted()
        x = _as_matrix(x, name, self.dim)
        return self._length_normalise((x - self.center) @ self.transform.T)

    def project(self, x, name="embeddings"):
        """Embeddings (N, d) -> (N, k) in the diagonal basis: W = I and B = diag(psi) there."""
        return (self.preprocess(x, name) - self.mu) @ self.diag_transform.T

    def _llr_terms(self, counts):
        """Per enrollment count n (E,) -> (shrink, 1/var_same, const) (E, k), (E, k), (E,) of the n-item LLR."""
        psi = self.psi
        n = np.asarray(counts, dtype=np.float64)[:, None]
        shrink = n * psi / (n * psi + 1.0)
        var_same = 1.0 + psi / (n * psi + 1.0)
        const = 0.5 * (np.log1p(psi) - np.log(var_same)).sum(1)
        return shrink, 1.0 / var_same, const

    def _llr(self, u, counts, v, pairs):
        """LLRs of enroll means u (E, k) with item counts (E,) against tests v: pairwise (E,) or matrix (E, M)."""
        shrink, inv_same, const = self._llr_terms(counts)
        inv_diff = 1.0 / (1.0 + self.psi)
        mean = shrink * u  # predictive mean of the test item under 'same'
        row = const - 0.5 * (mean**2 * inv_same).sum(1)
        if pairs:
            return row + (mean * inv_same * v).sum(1) - 0.5 * (v**2 * (inv_same - inv_diff)).sum(1)
        return row[:, None] + (mean * inv_same) @ v.T - 0.5 * (inv_same - inv_diff) @ (v**2).T

    def score_projected(self, u, v):
        """Trial LLRs (T,) of items already projected (project()): u (T, k) enroll, v (T, k) test; for scoring many
        trials over few items, project each item once and index rows."""
        return self._llr(u, np.ones(len(u)), v, pairs=True)

    def score(self, enroll, test):
        """Trial LLRs: enroll (T, d) and test (T, d) embeddings, row t a trial -> (T,) float64."""
        u, v = self.project(enroll, "enroll embeddings"), self.project(test, "test embeddings")
        if len(u) != len(v):
            raise UserError(f"{len(u)} enroll but {len(v)} test embeddings: trials pair them row by row")
        return self._llr(u, np.ones(len(u)), v, pairs=True)

    def score_matrix(self, a, b):
        """LLRs of every item of a (n, d) against every item of b (m, d) -> (n, m) float64 (cohorts, all pairs)."""
        return self._llr(
            self.project(a, "first embeddings"), np.ones(len(a)), self.project(b, "second embeddings"), False
        )

    def enroll(self, items):
        """Enrollment models from several items each: a list of (n_i, d) arrays -> (means (E, k), counts (E,)).

        Each item is preprocessed, then the items of a model are averaged in the diagonal basis.
        """
        if len(items) == 0:
            raise UserError("no enrollment models given")
        counts = np.array([len(np.atleast_2d(group)) for group in items])
        if (counts == 0).any():
            raise UserError(f"enrollment model {int(np.argmin(counts))} has no items")
        u = self.project(np.concatenate([np.atleast_2d(group) for group in items]), "enroll embeddings")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return np.add.reduceat(u, starts, axis=0) / counts[:, None], counts

    def score_models(self, items, test):
        """LLRs of multi-item enrollments (a list of (n_i, d) arrays) against test items (m, d) -> (E, m) float64."""
        u, counts = self.enroll(items)
        return self._llr(u, counts, self.project(test, "test embeddings"), pairs=False)

    # ------------------------------------------------------------------ storage

    def to_dict(self):
        """The model as plain JSON-able values (lists of floats)."""
        self._check_fitted()
        return {
            "format": FORMAT,
            "dim": self.dim,
            "lda_dim": self.lda_dim,
            "whiten": self.whiten,
            "length_norm": self.length_norm,
            "center": self.center.tolist(),
            "transform": self.transform.tolist(),
            "mu": self.mu.tolist(),
            "between": self.between.tolist(),
            "within": self.within.tolist(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, state, source="PLDA model"):
        """Rebuild a model written by to_dict; UserError for anything missing or inconsistent."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{source} is not a PLDA model written by plda.py (format {FORMAT})")
        try:
            model = cls(state["lda_dim"], bool(state["whiten"]), bool(state["length_norm"]))
            center, transform = np.array(state["center"], float), np.array(state["transform"], float)
            mu, between, within = (np.array(state[key], float) for key in ("mu", "between", "within"))
            k = len(mu)
            shapes_ok = center.shape == (state["dim"],) and transform.shape == (k, state["dim"])
            shapes_ok &= between.shape == (k, k) and within.shape == (k, k)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source} is damaged: {type(err).__name__} {err}") from None
        if not shapes_ok:
            raise UserError(f"{source} is damaged: its matrices' shapes do not match")
        model.dim, model.center, model.transform = int(state["dim"]), center, transform
        model.mu, model.between, model.within = mu, between, within
        model.provenance = state.get("provenance")
        try:
            model._prepare()
        except np.linalg.LinAlgError:
            raise UserError(f"{source} is damaged: its within-class covariance is not positive definite") from None
        return model

    def from_covariances(self, mean, between, within):
        """Set the model by hand: preprocessing off (identity), y ~ N(mean, B), x = y + N(0, W); returns self."""
        self.mu = np.asarray(mean, dtype=np.float64)
        self.dim = len(self.mu)
        self.lda_dim, self.whiten, self.length_norm = None, False, False
        self.center, self.transform = np.zeros(self.dim), np.eye(self.dim)
        self.between, self.within = np.asarray(between, np.float64), np.asarray(within, np.float64)
        self._prepare()
        return self

    def save(self, path):
        """Write the model as JSON, atomically (full float precision)."""
        with atomic_write(path) as handle:
            json.dump(self.to_dict(), handle)
            handle.write("\n")

    @classmethod
    def load(cls, path):
        """Read a model written by save()."""
        try:
            with open(path, encoding="utf-8") as handle:
                state = json.load(handle)
        except FileNotFoundError:
            raise UserError(f"PLDA model not found: {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path} is not a PLDA model (JSON): {err}") from None
        return cls.from_dict(state, path)
