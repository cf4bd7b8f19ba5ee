"""Score calibration and fusion: verification scores -> log-likelihood ratios (natural log).

Linear logistic-regression calibration, the standard back-end of speaker recognition (Brümmer's FoCal /
the BOSARIS toolkit): llr = a * score + b for one scorer, llr = w . scores + b for a fusion of several,
fitted on development trials at a chosen target prior. The parameters are a small JSON file
(fit_calibration -> utils.write_json -> load_calibration -> apply_calibration), so the same
calibration can be applied to evaluation scores later. Also the reader of eval.py's score files (text and
.npz), in bounded memory: ~9 bytes a trial for two float32 columns, the labels and nothing else.

Calibrated columns are named `cal_<scorer>` (one scorer) and `cal_<a>+<b>` (a fusion of a and b):
every column whose name starts with `cal_` holds LLRs.
"""

import contextlib
import dataclasses
import json
import math
import os
import struct
import sys
import warnings
import zipfile

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from e2e_verification.scoring import PROVENANCE_LINE
from utils import UserError

LEGACY_COLUMNS = ("e2e", "cos", "fus")
"""Score columns of a score file without a header line: `enroll test e2e cos fus label`."""
LABEL_WORDS = {"target": True, "nontarget": False}
NPZ_SPECIAL = ("enroll", "test", "label", "ids", "provenance")
"""Members of a score .npz (scoring.write_table_npz) that are not score columns."""
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first bytes (the second: an empty one)
PREFIX = "cal_"
FIT_CHUNK = 1 << 18  # trials per step of the fit's objective: its float64 temporaries take ~100 bytes a trial
TEXT_CHUNK = 1 << 22  # characters of a text score file parsed at once (~70,000 lines, ~10 MB of temporaries)
RIDGE = 1e-7
"""Weight decay on the standardised weights (not the bias): keeps the optimum finite when the development
trials are perfectly separated; it moves a well-posed fit by ~1e-4 relative or less (measured: 5e-5)."""


MIN_CALIBRATION_CLASSES = 10
"""Fewer held-out classes than this and a checkpoint's calibration comes with a warning. A rule of thumb from
docs/results/calibration_transfer.md: 74 held-out fonts carried a calibration to unseen ones (Cllr within 1.03x
its minimum), 2 held-out digits or Fashion-MNIST classes did not (1.26x to 1.79x)."""


def transfer_caveat(params):
    """Why a checkpoint's calibration (train_loop.validation_calibration) may not hold on classes it never saw: a
    clause, or None when its validation classes were held out of training and numerous enough (or it does not
    record them: a checkpoint of an older version)."""
    fitted = (params or {}).get("fitted_on") or {}
    classes = fitted.get("classes")
    if fitted.get("held_out") is False:
        return f"the model trained on its validation classes ({classes}), so its LLRs are over-confident on new ones"
    if classes is not None and classes < MIN_CALIBRATION_CLASSES:
        return f"it was fitted on {classes} held-out classes only, too few to hold on other classes"
    return None


def warn_checkpoint_calibration(params):
    """The one stderr line eval.py and verify.py print when they use a checkpoint's calibration that
    transfer_caveat doubts."""
    caveat = transfer_caveat(params)
    if caveat:
        print(
            f"warning: the checkpoint's calibration (fitted on its validation pairs) may be far from calibrated on new "
            f"classes: {caveat}; calibrate on development trials of new classes with calibrate.py",
            file=sys.stderr,
        )


def _check_trials(labels, p_target):
    """Bool labels (n,) with both classes and a prior in (0, 1), else a UserError."""
    labels = np.asarray(labels).reshape(-1).astype(bool)
    n_tar = int(labels.sum())
    if n_tar == 0 or n_tar == labels.shape[0]:
        raise UserError(f"calibration needs target and non-target trials; got {n_tar} of {labels.shape[0]} targets")
    check_p_target(p_target)
    return labels


def check_p_target(p_target, what="p_target"):
    """`p_target` when it lies strictly between 0 and 1, else a UserError naming it as `what`."""
    if not 0.0 < p_target < 1.0:
        raise UserError(f"{what} must lie strictly between 0 and 1, got {p_target}")
    return p_target


def train_linear_llr(features, labels, p_target, ridge=RIDGE):
    """Fit llr = features @ w + b by prior-weighted logistic regression: -> (w (d,), b) as float64.

    `features`: (n, d) or (n,) scores; `labels`: (n,) bool. Minimises
        p/n_tar * sum_tar log(1 + e^-(llr + logit p)) + (1-p)/n_non * sum_non log(1 + e^(llr + logit p)),
    the cross-entropy of the posterior at prior p (Brümmer's objective), so the targets and non-targets
    weigh p and 1-p whatever their counts, and llr = w.s + b is an LLR that is best calibrated around p.
    Solved with scipy's L-BFGS-B on the exact gradient, on standardised columns. scipy, not sklearn's
    LogisticRegression: there the fixed logit(p) offset would have to be subtracted from the fitted
    intercept afterwards and the default penalty (and liblinear's penalised intercept) switched off,
    while this objective is written once, as the toolkits define it.
    """
    x = np.asarray(features)
    return _fit_columns([x] if x.ndim == 1 else [x[:, k] for k in range(x.shape[1])], labels, p_target, ridge)


def _fit_columns(columns, labels, p_target, ridge=RIDGE):
    """train_linear_llr on d (n,) score columns of any float type, FIT_CHUNK trials at a time in float64, so
    the fit of tens of millions of trials needs no more than the columns themselves."""
    labels = _check_trials(labels, p_target)
    n = labels.shape[0]
    if any(np.ndim(c) != 1 or len(c) != n for c in columns):
        raise UserError("calibration needs one finite score per trial")
    mean, std = _moments(columns, n)
    n_tar = int(labels.sum())
    w_tar, w_non = p_target / n_tar, (1.0 - p_target) / (n - n_tar)
    offset = math.log(p_target) - math.log1p(-p_target)

    def objective(theta):
        loss, grad = ridge * float(theta[:-1] @ theta[:-1]), np.zeros_like(theta)
        grad[:-1] = 2.0 * ridge * theta[:-1]
        for part in _chunks(n, FIT_CHUNK):
            z = np.stack([(np.asarray(c[part], dtype=np.float64) - m) / s for c, m, s in zip(columns, mean, std)], 1)
            weight = np.where(labels[part], w_tar, w_non)
            sign = np.where(labels[part], 1.0, -1.0)
            margin = sign * (z @ theta[:-1] + theta[-1] + offset)  # log posterior odds of the true class
            loss += float(weight @ np.logaddexp(0.0, -margin))
            dz = -sign * weight * expit(-margin)  # d loss / d llr, per trial
            grad[:-1] += z.T @ dz
            grad[-1] += dz.sum()
        return loss, grad

    fit = minimize(
        objective, np.zeros(len(columns) + 1), jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10}
    )
    w = fit.x[:-1] / std
    return w, float(fit.x[-1] - w @ mean)


def _chunks(n, size):
    """Slices covering range(n), `size` long (the last shorter)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _moments(columns, n):
    """Mean and standard deviation (a 0 one as 1) of each column, in float64, a chunk at a time; a non-finite
    score raises a UserError."""
    sums, squares = np.zeros(len(columns)), np.zeros(len(columns))
    for part in _chunks(n, FIT_CHUNK):
        for k, column in enumerate(columns):
            values = np.asarray(column[part], dtype=np.float64)
            if not np.isfinite(values).all():
                raise UserError("calibration needs one finite score per trial")
            sums[k] += values.sum()
    mean = sums / n
    for part in _chunks(n, FIT_CHUNK):
        for k, column in enumerate(columns):
            squares[k] += np.square(np.asarray(column[part], dtype=np.float64) - mean[k]).sum()
    std = np.sqrt(squares / n)
    std[std == 0] = 1.0
    return mean, std


def fit_calibration(columns, labels, p_target, fusions=(), scorers=None):
    """Fit a linear calibration per scorer and a linear fusion per group: -> JSON-able parameters.

    `columns`: {name: (n,) scores}; `labels`: (n,) bool; `fusions`: lists of column names to fuse;
    `scorers`: the columns to calibrate alone (default all). Returns
    {"p_target": p, "calibrations": {name: {"a", "b"}}, "fusions": {"a+b": {"weights": {name: w}, "bias": b}}}.
    """
    labels = _check_trials(labels, p_target)
    scorers = list(columns) if scorers is None else list(scorers)
    _require_columns(columns, scorers + [name for group in fusions for name in group])
    params = {"p_target": float(p_target), "calibrations": {}, "fusions": {}}
    for name in scorers:
        (a,), b = _fit_columns([columns[name]], labels, p_target)
        params["calibrations"][name] = {"a": float(a), "b": b}
    for group in fusions:
        if len(group) < 2 or len(set(group)) != len(group):
            raise UserError(f"a fusion needs two or more different scorers, got {'+'.join(group)}")
        w, b = _fit_columns([columns[n] for n in group], labels, p_target)
        params["fusions"]["+".join(group)] = {"weights": dict(zip(group, map(float, w))), "bias": b}
    return params


def _require_columns(columns, names):
    """UserError naming the first of `names` that `columns` (a mapping or a list of names) lacks."""
    for name in names:
        if name not in columns:
            raise UserError(f"the scores have no column {name!r} (they have: {', '.join(columns)})")


def required_columns(params):
    """The score columns a calibration reads, in first-use order."""
    names = list(params["calibrations"])
    for fusion in params["fusions"].values():
        names += fusion["weights"]
    return list(dict.fromkeys(names))


def apply_calibration(params, columns, names=None):
    """LLR columns from score columns: {"cal_<name>": a*s + b, "cal_<a>+<b>": w.s + bias}.

    `columns`: {name: (n,) numpy array or tensor}; only arithmetic is used, so each output has its input's
    type and device. `names`: the cal_ columns wanted (default all). A column the parameters need and
    `columns` lacks raises a UserError.
    """
    _require_columns(columns, required_columns(params))
    out = {}
    for name, cal in params["calibrations"].items():
        if names is None or PREFIX + name in names:
            out[PREFIX + name] = cal["a"] * columns[name] + cal["b"]
    for name, fusion in params["fusions"].items():
        if names is None or PREFIX + name in names:
            llr = fusion["bias"]
            for col, w in fusion["weights"].items():
                llr = llr + w * columns[col]
            out[PREFIX + name] = llr
    return out


class ScoreTable:
    """Score columns and their labels as streaming_metrics.table_metrics reads scored pairs (len, n_targets,
    labels, chunks, block), so their metrics take ~4 bytes a trial; the calibrated columns of `params`
    (cal_*) are computed a chunk at a time, in float64, never whole."""

    def __init__(self, columns, labels, params=None):
        self.columns, self._labels, self.params = columns, np.asarray(labels, dtype=bool), params
        self.n_targets = int(self._labels.sum())

    def __len__(self):
        return len(self._labels)

    def labels(self, start, stop):
        return self._labels[start:stop]

    def chunks(self, chunk):
        return [(part.start, part.stop) for part in _chunks(len(self), chunk)]

    def block(self, scorers, start, stop):
        """{name: values of trials start..stop-1}: every score column, and the calibrated ones among `scorers`
        (names; None: all)."""
        raw = {name: values[start:stop] for name, values in self.columns.items()}
        if self.params is None or (scorers is not None and all(name in raw for name in scorers)):
            return raw
        wide = {name: np.asarray(raw[name], dtype=np.float64) for name in required_columns(self.params)}
        return {**raw, **apply_calibration(self.params, wide, scorers)}


def _number(value, where):
    """A finite float from JSON, else a UserError saying where."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def load_calibration(path, columns=None):
    """Read and check a calibration JSON written by calibrate.py: -> the parameters of fit_calibration, with
    "provenance" (the model of the scores it was fitted on, a dict) when the file records one.

    `columns`, when given (names or a mapping), must hold every score column the calibration reads.
    A missing or malformed file, or a missing column, raises a UserError of one line.
    """
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except OSError as err:
        raise UserError(f"cannot read calibration file {path}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"calibration file {path} is not valid JSON: {str(err).splitlines()[0]}") from None
    where = f"calibration file {path}:"
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), dict) for k in ("calibrations", "fusions")):
        raise UserError(f"{where} expected an object with 'p_target', 'calibrations' and 'fusions'")
    p_target = check_p_target(_number(raw.get("p_target"), f"{where} p_target"), f"{where} p_target")
    params = {"p_target": p_target, "calibrations": {}, "fusions": {}}
    for name, cal in raw["calibrations"].items():
        if not isinstance(cal, dict):
            raise UserError(f"{where} calibrations.{name} must be an object with 'a' and 'b'")
        params["calibrations"][name] = {k: _number(cal.get(k), f"{where} calibrations.{name}.{k}") for k in "ab"}
    for name, fusion in raw["fusions"].items():
        if not isinstance(fusion, dict) or not isinstance(fusion.get("weights"), dict) or not fusion["weights"]:
            raise UserError(f"{where} fusions.{name} must be an object with 'weights' (non-empty) and 'bias'")
        weights = {k: _number(w, f"{where} fusions.{name}.weights.{k}") for k, w in fusion["weights"].items()}
        params["fusions"][name] = {"weights": weights, "bias": _number(fusion.get("bias"), f"{where} {name}.bias")}
    if not params["calibrations"] and not params["fusions"]:
        raise UserError(f"{where} holds no calibration and no fusion")
    if raw.get("provenance") is not None:  # the model whose scores it was fitted on (calibrate.py copies it)
        if not isinstance(raw["provenance"], dict):
            raise UserError(f"{where} provenance must be an object (the model the scores came from) or null")
        params["provenance"] = raw["provenance"]
    if columns is not None:
        _require_columns(list(columns), required_columns(params))
    return params


# ----------------------------------------------------------------------------- score files


@dataclasses.dataclass
class ScoreFile:
    """A score file's trials: `columns` {name: (n,) float array}, `labels` (n,) bool, the item names `enroll`
    and `test` (lists of str; None unless asked for) and `provenance`, the model that made the scores (the
    dict of checkpoints.provenance_of; None when the file records none)."""

    columns: dict
    labels: np.ndarray
    enroll: list | None = None
    test: list | None = None
    provenance: dict | None = None


def read_score_file(path):
    """Read a score file of eval.py, text or .npz: -> (columns {name: (n,) float64}, labels (n,) bool, enroll,
    test). read_scores reads only some columns, in less memory, without the names, with the provenance."""
    scores = read_scores(path, ids=True)
    return scores.columns, scores.labels, scores.enroll, scores.test


def read_scores(path, columns=None, ids=False, dtype=np.float64):
    """Read the trials of a score file of eval.py: -> ScoreFile, its score columns as `dtype`.

    `columns`: the names to keep (default all); `ids`: also the enroll and test names. A text file holds an
    optional first line `# provenance {json}`, an optional header `# enroll test <names...> label` (else the
    columns are LEGACY_COLUMNS) and lines `enroll test <scores...> target|nontarget` (blank lines skipped);
    it is parsed a chunk at a time into numpy arrays, about 2 us a line. A .npz (scoring.write_table_npz,
    known by its content, not its name) has its float32 columns memory-mapped. A bad line, column or file
    raises a UserError naming the file (and the line).
    """
    names, provenance = score_file_names(path)
    keep = list(names) if columns is None else list(dict.fromkeys(columns))
    _require_columns(names, keep)
    read = _read_npz if _is_zip(path) else _read_text
    kept, labels, enroll, test = read(path, keep, ids, np.dtype(dtype))
    if not len(labels):
        raise UserError(f"{path}: no trials in the score file")
    return ScoreFile(kept, labels, enroll, test, provenance)


def score_file_names(path):
    """(score column names, provenance dict or None) of a score file, from its first lines (or .npz members)."""
    if _is_zip(path):
        with _open_npz(path) as archive:
            return _npz_names(archive), _npz_provenance(path, archive)
    with _open_text(path) as handle:
        names, provenance, _, _ = _text_header(path, handle)
    return names, provenance


def _is_zip(path):
    """True when the file at `path` starts as a zip archive (a .npz) does."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in ZIP_MAGIC
    except OSError as err:
        raise UserError(f"cannot read score file {path}: {err.strerror or err}") from None


@contextlib.contextmanager
def _open_text(path):
    """A text score file opened for reading, its read and decoding errors turned into UserErrors."""
    try:
        handle = open(path)
    except OSError as err:
        raise UserError(f"cannot read score file {path}: {err.strerror or err}") from None
    try:
        with handle:
            yield handle
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a score file (neither text nor a .npz archive)") from None
    except OSError as err:
        raise UserError(f"cannot read score file {path}: {err.strerror or err}") from None


def _text_header(path, handle):
    """Read a text score file's provenance and header lines: -> (names, provenance, the lines read that hold
    trials, the number of the first of them)."""
    line, lineno, provenance = handle.readline().removeprefix("\ufeff"), 1, None  # a byte-order mark: no text
    if line.startswith(PROVENANCE_LINE):
        provenance = _parse_provenance(f"{path}:1", line[len(PROVENANCE_LINE) :])
        line, lineno = handle.readline(), 2
    if line.startswith("#"):
        return _parse_header(path, lineno, line), provenance, [], lineno + 1
    return list(LEGACY_COLUMNS), provenance, [line] if line else [], lineno


def _parse_provenance(where, text):
    """The provenance dict from its JSON text, else a UserError saying where."""
    try:
        provenance = json.loads(text)
    except ValueError as err:
        raise UserError(f"{where}: the provenance is not valid JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(provenance, dict):
        raise UserError(f"{where}: the provenance must be a JSON object, got {type(provenance).__name__}")
    return provenance


def _parse_header(path, lineno, line):
    """Score column names from a header `# enroll test <names...> label`."""
    words = line[1:].split()
    if len(words) < 4 or words[:2] != ["enroll", "test"] or words[-1] != "label":
        raise UserError(
            f"{path}:{lineno}: a header must read '# enroll test <score columns...> label', got {line.strip()!r}"
        )
    names = words[2:-1]
    if len(set(names)) != len(names):
        raise UserError(f"{path}:{lineno}: repeated score column name in the header")
    return names


def _read_text(path, keep, ids, dtype):
    """The trials of a text score file, TEXT_CHUNK characters at a time: -> (columns, labels, enroll, test)."""
    with _open_text(path) as handle:
        names, _, lines, lineno = _text_header(path, handle)
        where = [names.index(name) for name in keep]
        store, enroll, test = None, [] if ids else None, [] if ids else None
        while lines := lines + handle.readlines(TEXT_CHUNK):
            values, labels, chunk_ids = _parse_lines(path, lines, names, lineno, dtype, ids)
            if store is None:  # sized from the first chunk's line length, grown if the guess falls short
                guess = os.fstat(handle.fileno()).st_size * len(lines) // max(1, sum(map(len, lines)))
                store = _Columns(keep, dtype, guess + guess // 20 + len(lines))
            store.append([values[:, k] for k in where], labels)
            if ids:
                enroll += chunk_ids[0]
                test += chunk_ids[1]
            lineno, lines = lineno + len(lines), []
    columns, labels = store.result() if store else ({name: np.empty(0, dtype) for name in keep}, np.empty(0, bool))
    return columns, labels, enroll, test


class _Columns:
    """Score columns and labels filled a chunk at a time into arrays grown in place (realloc), then trimmed."""

    def __init__(self, names, dtype, capacity):
        self.columns = {name: np.empty(capacity, dtype) for name in names}
        self.labels = np.empty(capacity, bool)
        self.n = 0

    def append(self, columns, labels):
        stop = self.n + len(labels)
        if stop > len(self.labels):
            self._resize(max(stop, len(self.labels) + len(self.labels) // 4))
        for column, values in zip(self.columns.values(), columns):
            column[self.n : stop] = values
        self.labels[self.n : stop] = labels
        self.n = stop

    def _resize(self, size):
        for array in (*self.columns.values(), self.labels):
            array.resize(size, refcheck=False)

    def result(self):
        self._resize(self.n)
        return self.columns, self.labels


def _parse_lines(path, lines, names, lineno, dtype, ids=False):
    """Trials from text lines numbered from `lineno`: -> (scores (rows, columns) `dtype`, labels (rows,) bool,
    (enroll, test) lists or None). numpy's parser takes the lines; when it refuses them (a bad line, or a
    number only Python reads, such as 1_000) or when the names are wanted, a line-by-line pass does."""
    if not ids:
        parsed = _parse_fast(lines, len(names), dtype)
        if parsed is not None:
            return *parsed, None
    return _parse_slow(path, lines, names, lineno, dtype)


def _parse_fast(lines, n_scores, dtype):
    """(scores, labels) of well-formed finite lines via np.loadtxt (which checks every line's field count),
    else None. The names are read as one character and dropped."""
    fields = [("enroll", "U1"), ("test", "U1"), *((f"s{k}", "f8") for k in range(n_scores)), ("label", "U10")]
    try:
        with warnings.catch_warnings():  # a chunk of blank lines warns "input contained no data"
            warnings.simplefilter("ignore")
            rows = np.loadtxt(lines, dtype=np.dtype(fields), comments=None, quotechar=None, ndmin=1)
    except ValueError:
        return None
    labels = rows["label"] == "target"
    if not (labels | (rows["label"] == "nontarget")).all():
        return None
    values = np.empty((len(rows), n_scores), dtype)
    with np.errstate(over="ignore"):  # beyond float32's range: left to _parse_slow's message
        for k in range(n_scores):
            values[:, k] = rows[f"s{k}"]
    return (values, labels) if np.isfinite(values).all() else None


def _parse_slow(path, lines, names, first, dtype):
    """_parse_lines line by line (the first is number `first`), each line checked: a bad one raises a
    UserError naming `path` and its number."""
    enroll, test, labels, values, linenos = [], [], [], [], []
    n_scores = len(names)
    for lineno, line in enumerate(lines, first):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_scores + 3 or fields[-1] not in LABEL_WORDS:
            _bad_fields(path, lineno, fields, names)
        try:
            values.extend(map(float, fields[2:-1]))
        except ValueError:
            raise UserError(f"{path}:{lineno}: a score is not a number: {' '.join(fields[2:-1])!r}") from None
        enroll.append(fields[0])
        test.append(fields[1])
        labels.append(LABEL_WORDS[fields[-1]])
        linenos.append(lineno)
    wide = np.array(values, dtype=np.float64).reshape(len(labels), n_scores)
    with np.errstate(over="ignore"):
        values = wide.astype(dtype)
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        k = int(bad.argmax())
        beyond = f" within {dtype}'s range" if np.isfinite(wide[k]).all() else ""
        raise UserError(f"{path}:{linenos[k]}: scores must be finite numbers{beyond}")
    return values, np.array(labels, dtype=bool), (enroll, test)


def _bad_fields(path, lineno, fields, names):
    """The UserError for a line with the wrong number of fields or an unknown label."""
    if len(fields) != len(names) + 3:
        layout = " ".join(["enroll", "test", *names, "label"])
        raise UserError(f"{path}:{lineno}: expected {len(names) + 3} fields ({layout}), got {len(fields)}")
    raise UserError(f"{path}:{lineno}: the label must be target or nontarget, got {fields[-1]!r}")


@contextlib.contextmanager
def _open_npz(path):
    """A score .npz opened as a zip archive, its read and format errors turned into UserErrors."""
    try:
        with zipfile.ZipFile(path) as archive:
            yield archive
    except OSError as err:
        raise UserError(f"cannot read score file {path}: {err.strerror or err}") from None
    except (zipfile.BadZipFile, EOFError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npz score file: {err}") from None


def _npz_names(archive):
    """The score column names of a score .npz: its `<name>.npy` members but NPZ_SPECIAL, in archive order."""
    members = [info.filename[: -len(".npy")] for info in archive.infolist() if info.filename.endswith(".npy")]
    return [name for name in members if name not in NPZ_SPECIAL]


def _npz_provenance(path, archive):
    """The provenance dict of member provenance.npy (a 0-d str array of JSON), or None without one."""
    if "provenance.npy" not in archive.namelist():
        return None
    with archive.open("provenance.npy") as member:
        text = np.lib.format.read_array(member, allow_pickle=False)
    if text.shape != () or text.dtype.kind != "U":
        raise UserError(f"{path}: provenance.npy must hold one string (JSON), got {text.dtype} {text.shape}")
    return _parse_provenance(f"{path}: provenance.npy", str(text))


def _read_npz(path, keep, ids, dtype):
    """The trials of a score .npz: -> (columns, labels, enroll, test), memory-mapped where stored as asked."""
    with _open_npz(path) as archive:
        labels = _npz_member(path, archive, "label")
        if labels.dtype != bool or labels.ndim != 1:
            raise UserError(f"{path}: label.npy must be a (trials,) bool array, got {labels.dtype} {labels.shape}")
        columns = {name: _npz_column(path, archive, name, len(labels), dtype) for name in keep}
        enroll = test = None
        if ids:
            names = _npz_member(path, archive, "ids")
            enroll, test = (_npz_names_of(path, archive, side, names, len(labels)) for side in ("enroll", "test"))
    return columns, labels, enroll, test


def _npz_names_of(path, archive, side, names, n):
    """The item names of each trial's `side` (enroll or test): its indices into ids.npy, looked up."""
    index = _npz_member(path, archive, side)
    if index.shape != (n,) or index.dtype.kind not in "iu" or (n and not 0 <= index.min() <= index.max() < len(names)):
        raise UserError(f"{path}: {side}.npy must hold ({n},) indices into ids.npy")
    return names[index].tolist()


def _npz_column(path, archive, name, n, dtype):
    """Score column `name` of a .npz as `dtype` (a memory map when stored so), checked: (n,) and finite."""
    values = _npz_member(path, archive, name)
    if values.ndim != 1 or len(values) != n or values.dtype.kind != "f":
        raise UserError(f"{path}: {name}.npy must be a ({n},) float array, got {values.dtype} {values.shape}")
    for part in _chunks(n, FIT_CHUNK):
        if not np.isfinite(values[part]).all():
            raise UserError(f"{path}: {name}.npy holds a non-finite score (trial {part.start + 1} or after)")
    return values if values.dtype == dtype else values.astype(dtype)


def _npz_member(path, archive, name):
    """Array member `name` of a .npz: a read-only memory map of the file when stored uncompressed, else read."""
    if name + ".npy" not in archive.namelist():
        raise UserError(f"{path}: a .npz score file needs a {name}.npy member")
    info = archive.getinfo(name + ".npy")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if info.compress_type != zipfile.ZIP_STORED or version not in ((1, 0), (2, 0)):
            member.seek(0)
            return np.lib.format.read_array(member, allow_pickle=False)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)
        header = member.tell()
    size = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or header + size != info.file_size:
        raise UserError(f"{path}: {name}.npy is not a plain array of its header's size")
    if size == 0:
        return np.empty(shape, dtype)
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)  # a zip member's local header: 30 bytes, then its name and extra field
    if local[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: {name}.npy: broken zip member header")
    start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30])) + header
    return np.memmap(path, dtype, "r", start, shape, "F" if fortran else "C")
