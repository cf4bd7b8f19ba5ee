"""Score calibration and fusion: verification scores -> log-likelihood ratios (natural log).

Linear logistic-regression calibration, the standard back-end of speaker recognition (Brümmer's FoCal /
the BOSARIS toolkit): llr = a * score + b for one scorer, llr = w . scores + b for a fusion of several,
fitted on development trials at a chosen target prior. The parameters are a small JSON file
(fit_calibration -> utils.write_json -> load_calibration -> apply_calibration), so the same
calibration can be applied to evaluation scores later. Also the reader of eval.py's score files.

Calibrated columns are named `cal_<scorer>` (one scorer) and `cal_<a>+<b>` (a fusion of a and b):
every column whose name starts with `cal_` holds LLRs.
"""

import itertools
import json
import math

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from utils import UserError

LEGACY_COLUMNS = ("e2e", "cos", "fus")
"""Score columns of a score file without a header line: `enroll test e2e cos fus label`."""
LABEL_WORDS = {"target": True, "nontarget": False}
PREFIX = "cal_"
RIDGE = 1e-7
"""Weight decay on the standardised weights (not the bias): keeps the optimum finite when the development
trials are perfectly separated; it moves a well-posed fit by ~1e-4 relative or less (measured: 5e-5)."""


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
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(-1, 1) if x.ndim == 1 else x
    labels = _check_trials(labels, p_target)
    if x.shape[0] != labels.shape[0] or not np.isfinite(x).all():
        raise UserError("calibration needs one finite score per trial")
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    z = (x - mean) / std
    n_tar = int(labels.sum())
    weight = np.where(labels, p_target / n_tar, (1.0 - p_target) / (labels.shape[0] - n_tar))
    sign = np.where(labels, 1.0, -1.0)
    offset = math.log(p_target) - math.log1p(-p_target)

    def objective(theta):
        margin = sign * (z @ theta[:-1] + theta[-1] + offset)  # log posterior odds of the true class
        loss = float(weight @ np.logaddexp(0.0, -margin)) + ridge * float(theta[:-1] @ theta[:-1])
        dz = -sign * weight * expit(-margin)  # d loss / d llr, per trial
        grad = np.concatenate([z.T @ dz + 2.0 * ridge * theta[:-1], [dz.sum()]])
        return loss, grad

    fit = minimize(
        objective, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10}
    )
    w = fit.x[:-1] / std
    return w, float(fit.x[-1] - w @ mean)


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
        (a,), b = train_linear_llr(columns[name], labels, p_target)
        params["calibrations"][name] = {"a": float(a), "b": b}
    for group in fusions:
        if len(group) < 2 or len(set(group)) != len(group):
            raise UserError(f"a fusion needs two or more different scorers, got {'+'.join(group)}")
        w, b = train_linear_llr(
            np.stack([np.asarray(columns[n], dtype=np.float64) for n in group], 1), labels, p_target
        )
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


def apply_calibration(params, columns):
    """LLR columns from score columns: {"cal_<name>": a*s + b, "cal_<a>+<b>": w.s + bias}.

    `columns`: {name: (n,) numpy array or tensor}; only arithmetic is used, so each output has its input's
    type and device. A column the parameters need and `columns` lacks raises a UserError.
    """
    _require_columns(columns, required_columns(params))
    out = {}
    for name, cal in params["calibrations"].items():
        out[PREFIX + name] = cal["a"] * columns[name] + cal["b"]
    for name, fusion in params["fusions"].items():
        llr = fusion["bias"]
        for col, w in fusion["weights"].items():
            llr = llr + w * columns[col]
        out[PREFIX + name] = llr
    return out


def _number(value, where):
    """A finite float from JSON, else a UserError saying where."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def load_calibration(path, columns=None):
    """Read and check a calibration JSON written by calibrate.py: -> the parameters of fit_calibration.

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
    if columns is not None:
        _require_columns(list(columns), required_columns(params))
    return params


def _parse_header(path, line):
    """Score column names from a header `# enroll test <names...> label`."""
    words = line[1:].split()
    if len(words) < 4 or words[:2] != ["enroll", "test"] or words[-1] != "label":
        raise UserError(f"{path}:1: a header must read '# enroll test <score columns...> label', got {line.strip()!r}")
    names = words[2:-1]
    if len(set(names)) != len(names):
        raise UserError(f"{path}:1: repeated score column name in the header")
    return names


def read_score_file(path):
    """Read a score file of eval.py: -> (columns {name: (n,) float64}, labels (n,) bool, enroll, test).

    Lines are `enroll test <scores...> target|nontarget`; an optional first line `# enroll test <names...>
    label` names the score columns, else they are LEGACY_COLUMNS. Blank lines are skipped. A bad line
    raises a UserError naming the file and the line. Read line by line (about 3 s per million trials).
    """
    try:
        with open(path) as handle:
            first = handle.readline()
            if first.startswith("#"):
                names, lines, start = _parse_header(path, first), handle, 2
            else:
                names, lines, start = list(LEGACY_COLUMNS), itertools.chain([first], handle), 1
            enroll, test, labels, values, linenos = _read_trials(path, lines, names, start)
    except OSError as err:
        raise UserError(f"cannot read score file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text score file") from None
    if not labels:
        raise UserError(f"{path}: no trials in the score file")
    values = np.array(values, dtype=np.float64).reshape(len(labels), len(names))
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        raise UserError(f"{path}:{linenos[int(bad.argmax())]}: scores must be finite numbers")
    columns = {name: values[:, k].copy() for k, name in enumerate(names)}
    return columns, np.array(labels, dtype=bool), enroll, test


def _read_trials(path, lines, names, start):
    """Split and check trial lines numbered from `start`: -> enroll, test, labels, flat values, line numbers."""
    enroll, test, labels, values, linenos = [], [], [], [], []
    n_scores = len(names)
    for lineno, line in enumerate(lines, start):
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
    return enroll, test, labels, values, linenos


def _bad_fields(path, lineno, fields, names):
    """The UserError for a line with the wrong number of fields or an unknown label."""
    if len(fields) != len(names) + 3:
        layout = " ".join(["enroll", "test", *names, "label"])
        raise UserError(f"{path}:{lineno}: expected {len(names) + 3} fields ({layout}), got {len(fields)}")
    raise UserError(f"{path}:{lineno}: the label must be target or nontarget, got {fields[-1]!r}")
