"""Hyperparameter search shared by hp_search.py and hp_search_slurm.py: spaces, the submit tuple, the trial log.

A search is a sequence of nevergrad ask/tell events. Each event is appended (fsync'd) to a JSONL trial
log under --checkpoint-path as it happens, so a restarted search replays the log into a fresh optimizer
with the same seed (same events, same state), runs again the trials that had started but not finished,
and asks for the rest of the budget. Finished trials never run twice.
"""

import json
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import nevergrad as ng

import models
from e2e_verification import training
from e2e_verification.tasks import task_for_args
from losses import HEADS
from utils import UserError, write_json

LOG_NAME = "hp_trials.jsonl"
BEST_NAME = "hp_best.json"
FAILED_LOSS = 1.0  # told to the optimizer for a failed trial: no EER is worse
DEFAULT_OPTIMIZER = "NGOpt"
RESUME_MAY_CHANGE = ("budget", "workers")  # header entries a resumed search may change
MAX_REPEATS = 100  # asks in a row answered from known points before a repeated point is trained anyway

# The --softmax values searched: the heads of losses.HEADS marked `hp_search`, the plain head first, then
# the margin heads in registry order (the seed's ["softmax", "am_softmax"]; a search's log depends on the order).
SEARCHED_HEADS = tuple(sorted((n for n, c in HEADS.items() if c.hp_search), key=lambda n: HEADS[n].takes_margin))

# name -> [kind, values]: "log" = log-uniform on [lo, hi]; "ordered" = ordinal choice (nevergrad's
# TransitionChoice, the old OrderedDiscrete); "choice" = unordered categories. Values are the seed's (§8).
IMAGE_SPACE = {
    "lr": ["log", 1e-3, 0.5],
    "l2": ["log", 1e-5, 1e-2],
    "momentum": ["ordered", [0.1, 0.5, 0.9]],
    "smoothing": ["ordered", [0.0, 0.1, 0.2]],
    "patience": ["ordered", [1, 5, 10, 20]],
    "warmup": ["ordered", [1, 500, 2000]],
    "n_hidden": ["ordered", [2, 3, 4, 5]],
    "hidden_size": ["ordered", [128, 256, 350, 512]],
    "dropout_prob": ["ordered", [0.01, 0.1, 0.2]],
    "softmax": ["choice", list(SEARCHED_HEADS)],
}
SPEECH_SPACE = {
    "lr": ["log", 0.1, 2.0],
    "l2": ["log", 1e-5, 1e-3],
    "momentum": ["ordered", [0.7, 0.85, 0.95]],
    "smoothing": ["ordered", [0.0, 0.1, 0.2]],
    "patience": ["ordered", [1, 5, 10, 20]],
    "warmup": ["ordered", [1, 500, 2000]],
    "latent_size": ["ordered", [128, 256, 512]],
    "n_hidden": ["ordered", [1, 2, 3, 4]],
    "hidden_size": ["ordered", [128, 256, 350, 512]],
    "n_frames": ["ordered", [300, 500, 800]],
    "dropout_prob": ["ordered", [0.01, 0.1, 0.2]],
    "softmax": ["choice", list(SEARCHED_HEADS)],
    "max_gnorm": ["ordered", [10.0, 20.0, 50.0]],
}
SPACES = {"image": IMAGE_SPACE, "speech": SPEECH_SPACE}  # by task name
SCHEDULE_ONLY = {"warmup": "noam", "patience": "plateau"}  # searched only under that LR schedule
RPROJ_FRACTIONS = [-1, 0.3, 0.5, 0.8]  # of the learned distance's input, 2 x embedding size; -1 = off

# The $1..$27 of run_hp_slurm.sh / run_hp_sge.sh, in the seed's order: training flag names (dests).
SUBMIT_FIELDS = (
    "lr", "l2", "momentum", "smoothing", "warmup", "latent_size", "n_hidden", "hidden_size", "n_frames",
    "model", "ndiscriminators", "rproj_size", "ncoef", "dropout_prob", "epochs", "batch_size",
    "valid_batch_size", "workers", "cuda", "train_hdf_file", "valid_hdf_file", "out_file", "checkpoint_path",
    "cp_name", "softmax", "max_gnorm", "logdir",
)  # fmt: skip


def add_search_flags(parser, budget):
    """The flags every search adds to the training parser; returns their actions (see `training_argv`)."""
    g = parser.add_argument_group("search")
    return [
        g.add_argument("--budget", type=training.positive(int), default=budget, help=f"trials (default {budget})"),
        g.add_argument(
            "--optimizer",
            default=DEFAULT_OPTIMIZER,
            help=f"a nevergrad optimizer name (default {DEFAULT_OPTIMIZER}, its adaptive recommendation; "
            "RandomSearch is the seed's)",
        ),
        g.add_argument(
            "--rproj",
            action="store_true",
            help="also search --rproj-size, as a fraction (off, 0.3, 0.5, 0.8) of the learned distance's input",
        ),
    ]


def training_argv(argv, own_actions):
    """`argv` without the options of `own_actions` and their values: the training part of a search command.

    Exact because search parsers are built with allow_abbrev=False (no option is ever abbreviated).
    """
    takes_value = {s: a.nargs != 0 for a in own_actions for s in a.option_strings}
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in takes_value:
            skip = takes_value[name] and "=" not in token
            continue
        out.append(token)
    return out


def resolve_base(argv):
    """Parse and resolve the training part of a search command line; returns (args, models searched or None)."""
    args = training.build_parser().parse_args(argv)
    search_all = args.model == "all"
    if search_all:
        args.model = None
    args = training.resolve_defaults(args, argv)
    task = task_for_args(args)
    search_models = models.encoder_names(task.name) if search_all else None
    for flag in ("data_path", "valid_data_path", "train_hdf_file", "valid_hdf_file"):
        path = getattr(args, flag)
        if path is not None and path != "digits" and not os.path.exists(path):
            raise UserError(f"--{flag.replace('_', '-')} {path} does not exist")
    if not task.has_validation(args):
        raise UserError(f"a search scores trials on validation data: give {task.valid_flag}")
    return args, search_models


def space_spec(args, search_models=None, rproj=False, only=None):
    """The searched hyperparameters for resolved training `args`: {name: [kind, values...]} (JSON-able).

    Only those that apply: the data kind's table, warmup under noam and patience under plateau, the
    model with `--model all`, the rproj fraction with `--rproj`, and with `only` (the submit fields)
    just what a submit script can pass.
    """
    table = SPACES[task_for_args(args).name]
    spec = {k: v for k, v in table.items() if SCHEDULE_ONLY.get(k, args.lr_schedule) == args.lr_schedule}
    if search_models:
        spec["model"] = ["choice", list(search_models)]
    if rproj:
        spec["rproj"] = ["ordered", RPROJ_FRACTIONS]
    if only is not None:
        spec = {k: v for k, v in spec.items() if k in only or k == "rproj"}
    return spec


def parametrization(spec, seed):
    """The nevergrad parametrization (a Dict) of a space spec, seeded.

    Categorical choices are deterministic (argmax, not softmax sampling): with sampled choices nevergrad
    deems the objective noisy and NGOpt then picks optimizers that re-evaluate the same points.
    """
    params = {}
    for name, (kind, *rest) in spec.items():
        if kind == "log":
            params[name] = ng.p.Log(lower=rest[0], upper=rest[1])
        elif kind == "ordered":
            params[name] = ng.p.TransitionChoice(rest[0])
        else:
            params[name] = ng.p.Choice(rest[0], deterministic=True)
    p = ng.p.Dict(**params)
    p.random_state.seed(seed % 2**32)
    return p


def make_optimizer(name, spec, budget, workers, seed):
    """A nevergrad optimizer over the space; asks and tells all happen in the search's main thread.

    The default, NGOpt, is nevergrad's recommendation: it picks an algorithm from the parametrization,
    budget and workers (for these mostly ordinal spaces a discrete (1+1) evolution strategy, which
    mutates the best point so far), where the seed's RandomSearch ignores every result.
    """
    if name not in ng.optimizers.registry:
        raise UserError(f"unknown --optimizer {name}; e.g. NGOpt, RandomSearch, OnePlusOne, TwoPointsDE")
    return ng.optimizers.registry[name](parametrization=parametrization(spec, seed), budget=budget, num_workers=workers)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def embedding_size(model):
    """Embedding size of an encoder built with its default arguments (the learned distance sees twice that)."""
    return models.create_encoder(model).embedding_size


def training_values(params, base):
    """Searched values -> training flag values (dests): the rproj fraction becomes --rproj-size."""
    values = {k: _plain(v) for k, v in params.items() if k != "rproj"}
    if "rproj" in params:
        frac = params["rproj"]
        model = values.get("model", base.model)
        values["rproj_size"] = -1 if frac <= 0 else int(frac * 2 * embedding_size(model))
    return values


def render(value):
    """One command-line value: None -> 'None', booleans -> 'True'/'False', floats exactly (repr)."""
    if value is None or isinstance(value, bool):
        return str(value)
    return repr(value) if isinstance(value, float) else str(value)


def flags(values):
    """{dest: value} -> ['--dest-name', 'value', ...] for the training parser."""
    return [item for k, v in values.items() for item in ("--" + k.replace("_", "-"), render(v))]


def submit_args(values):
    """The 27 positional arguments of a submit script, in SUBMIT_FIELDS order, as strings."""
    missing = [f for f in SUBMIT_FIELDS if f not in values]
    assert not missing, f"submit values lack {missing}"
    return [render(values[f]) for f in SUBMIT_FIELDS]


def train_objective(args, argv):
    """Train through training.build and training.fit; returns the best validation EERs {'e2e', 'cos'}, the objective
    being e2e."""
    trainer = training.fit(training.build(args, argv)).trainer
    best = {k: float(v) for k, v in trainer.best.items()}
    if not math.isfinite(best["e2e"]):
        raise UserError("training ended with no validation EER (is there validation data?)")
    return best


def read_objective(path):
    """The objective a trial wrote to its out-file (one float); UserError when missing or unreadable."""
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        raise UserError(f"the trial wrote no out-file {path}") from None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"out-file {path} holds {text[:40]!r}, not a number") from None
    if not math.isfinite(value):
        raise UserError(f"out-file {path} holds {value}")
    return value


class TrialLog:
    """The append-only JSONL record of a search: a header line, then one event per line.

    Events: start (trial, params), end (trial, params, status, objective, error, duration, ...), restart
    (an unfinished trial run again after a resume), repeat (a known point asked again) and job (a
    cluster job id, as soon as it is known).
    """

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, LOG_NAME)
        self.best_path = os.path.join(folder, BEST_NAME)
        self.lock = threading.Lock()

    def load(self):
        """The events recorded so far; a line cut short by a kill is dropped (and cut off the file)."""
        if not os.path.exists(self.path):
            return []
        with self.lock:
            with open(self.path, "rb") as handle:
                data = handle.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                os.truncate(self.path, end)
        try:
            return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise UserError(f"{self.path} is damaged ({err}); move it away to start a new search") from None

    def append(self, event):
        """Append one event and fsync it, so a kill never loses a recorded trial (thread-safe)."""
        with self.lock, open(self.path, "a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def open(self, header):
        """Start a new log with `header`, or check that the existing one holds the same search; returns events."""
        events = self.load()
        if not events:
            self.append({"event": "search", **header})
            return self.load()
        old = events[0]
        for key, value in header.items():
            if key not in RESUME_MAY_CHANGE and old.get(key) != value:
                raise UserError(
                    f"{self.path} holds a search with another {key} ({old.get(key)!r}, now {value!r}); "
                    "restart with the same arguments or use another --checkpoint-path"
                )
        return events

    def save_best(self, events):
        """Write the best finished trial so far to hp_best.json; returns it (None if none succeeded)."""
        ends = [e for e in events if e["event"] == "end" and e["status"] == "ok"]
        if not ends:
            return None
        best = min(ends, key=lambda e: (e["objective"], e["trial"]))
        record = {"trial": best["trial"], "objective": best["objective"], "params": best["params"]}
        record.update({k: best[k] for k in ("command", "cos_eer") if k in best})
        write_json(self.best_path, record)
        return record


def _key(params):
    return json.dumps(params, sort_keys=True)


class Search:
    """The ask/tell state of a search, kept in step with its trial log (every optimizer call is an event).

    Replaying a log into a fresh optimizer with the same seed repeats its asks and tells exactly; should
    an ask differ from the record (another nevergrad version), the recorded point is told as not asked.
    A point the optimizer asks for again after it was scored is told its known loss (a 'repeat' event)
    rather than trained twice.
    """

    def __init__(self, log, optimizer):
        self.log = log
        self.optimizer = optimizer
        self.trials = {}  # trial -> (candidate, params)
        self.losses = {}  # params key -> loss of a finished trial
        self.finished = set()

    def _ask(self, recorded=None):
        candidate = self.optimizer.ask()
        params = {k: _plain(v) for k, v in candidate.value.items()}
        if recorded is not None and params != recorded:
            candidate, params = self.optimizer.parametrization.spawn_child(new_value=recorded), recorded
        return candidate, params

    def _tell(self, candidate, loss):
        try:
            self.optimizer.tell(candidate, loss)
        except ng.errors.TellNotAskedNotSupportedError:
            pass

    def _finish(self, event):
        candidate, params = self.trials[event["trial"]]
        loss = event["objective"] if event["status"] == "ok" else FAILED_LOSS
        self._tell(candidate, loss)
        self.losses[_key(params)] = loss
        self.finished.add(event["trial"])

    def replay(self, events):
        """Feed recorded events to the optimizer; returns the unfinished trials [(trial, (candidate, params))]."""
        for event in events:
            if event["event"] == "start":
                self.trials[event["trial"]] = self._ask(event["params"])
            elif event["event"] == "repeat":
                self._tell(self._ask(event["params"])[0], event["loss"])
            elif event["event"] == "end":
                self._finish(event)
        return sorted((t, pair) for t, pair in self.trials.items() if t not in self.finished)

    def ask(self, trial):
        """The params of a new trial (recorded as started); known points are told again, up to MAX_REPEATS."""
        for attempt in range(MAX_REPEATS + 1):
            candidate, params = self._ask()
            loss = self.losses.get(_key(params))
            if loss is None or attempt == MAX_REPEATS:
                break
            self._tell(candidate, loss)
            self.log.append({"event": "repeat", "params": params, "loss": loss})
        self.trials[trial] = (candidate, params)
        self.log.append({"event": "start", "trial": trial, "params": params, "time": time.time()})
        return params

    def end(self, trial, result):
        """Tell a finished trial (a failed one as FAILED_LOSS) and record it, with its params."""
        event = {"event": "end", "trial": trial, "params": self.trials[trial][1], "time": time.time(), **result}
        self._finish(event)
        self.log.append(event)


def _timed(run_trial, trial, params):
    start = time.time()
    result = run_trial(trial, params)
    assert result["status"] in ("ok", "failed"), result
    return {**result, "duration": round(time.time() - start, 3)}


def _launch(pool, run_trial, trial, params):
    if pool is None:  # serial: run in this thread (signals, progress bars and tracebacks as usual)
        future = Future()
        future.set_result(_timed(run_trial, trial, params))
        return future
    return pool.submit(_timed, run_trial, trial, params)


def run_search(log, header, optimizer, budget, workers, run_trial, on_interrupt=None):
    """Run trials until `budget` have finished, `workers` at a time; returns the best record (or None).

    `run_trial(trial, params)` returns {'status': 'ok' | 'failed', 'objective': float, 'error': str, ...};
    a failed trial is told to the optimizer as FAILED_LOSS and the search goes on.
    """
    search = Search(log, optimizer)
    queue = search.replay(log.open(header))
    started = len(search.trials)
    running = {}
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        while True:
            while len(running) < workers and (queue or started < budget):
                if queue:
                    trial, (_, params) = queue.pop(0)
                    log.append({"event": "restart", "trial": trial, "time": time.time()})
                else:
                    trial, started = started, started + 1
                    params = search.ask(trial)
                running[_launch(pool, run_trial, trial, params)] = trial
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=running.get):
                trial = running.pop(future)
                result = future.result()
                search.end(trial, result)
                report(trial, result)
                log.save_best(log.load())
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return log.save_best(log.load())


def report(trial, result):
    """One line per finished trial."""
    what = f"objective {result['objective']:.4f}" if result["status"] == "ok" else f"FAILED: {result['error']}"
    print(f"trial {trial}: {what} ({result['duration']:.0f} s)", flush=True)


def finish(best, log, budget):
    """Print the best configuration (saved in hp_best.json); a search where every trial failed is an error."""
    if best is None:
        raise UserError(f"all {budget} trials failed; see {log.path}")
    print(f"best trial {best['trial']}: objective (best validation e2e EER) {best['objective']:.4f}")
    print("  " + " ".join(f"{k}={render(v)}" for k, v in best["params"].items()))
    if "command" in best:
        print("  " + " ".join(best["command"]))
    print(f"saved to {log.best_path}; every trial in {log.path}")
    return 0
