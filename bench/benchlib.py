"""Shared bits of the bench scripts and of the accuracy studies in experiments/ (which put bench/ on sys.path):
the repository root on sys.path, their command line, a synchronised timer, ratio lines and the written results;
for the accuracy studies, the learned-distance variants, the recipes (recipes/*.args) and running the toolkit's
scripts in subprocesses.

Every bench script times a candidate against a baseline in the same run, on the same device, and
prints the ratio; absolute numbers depend on the machine, ratios much less.
"""

import argparse
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models.verifier import PAIR_FEATURES  # noqa: E402

# make_parser(doc, example, *tables): a bench's parser, as every script's.
from utils import UserError, atomic_write, check_outputs, make_parser  # noqa: E402, F401

# ----------------------------------------------------------------------------- checked option types
# Every numeric and list flag of the benches has one of these types: argparse calls it on the typed text (and on
# a default given as text), so a bad value is refused while the command line is parsed, in one line that names
# the flag ("argument --n: must be >= 2, got 0"), before any work. A value that means "default" or "all" (0 or
# None) is one the flag's help says it means; otherwise it is refused, never silently replaced.


def number(kind=int, low=None, high=None, above=None):
    """An argparse type: text -> a finite `kind` (int or float) with low <= value <= high and value > above (each
    bound when given)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


def at_least(low, high=None):
    """An argparse type: an integer >= `low` (and <= `high`)."""
    return number(int, low, high)


def positive_float(text):
    """An argparse type: a finite float > 0."""
    return number(float, above=0)(text)


def prior(text):
    """An argparse type: a target prior, strictly between 0 and 1 (calibration.check_p_target)."""
    from e2e_verification.calibration import check_p_target

    try:
        return check_p_target(number(float)(text), "a prior")
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def int_list(low=0, high=None):
    """An argparse type: comma-separated integers and ascending ranges ('1,2,3', '1-3', '0-3,8') -> sorted unique
    ints in [low, high]; a reversed range ('9-3') is refused, not read as empty."""

    def parse(text):
        values = set()
        for part in text.split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip(), re.ASCII)
            if match is None:
                raise argparse.ArgumentTypeError(f"expected integers like 1,2,3 or 1-3, got {text!r}")
            first, last = int(match[1]), int(match[2] or match[1])
            if last < first:
                raise argparse.ArgumentTypeError(f"range {part.strip()} runs backwards (write {last}-{first})")
            values.update(range(first, last + 1))
        outside = [v for v in sorted(values) if v < low or (high is not None and v > high)]
        if outside:
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{outside[0]} is outside {bounds}, in {text!r}")
        return sorted(values)

    return parse


def name_list(known, what):
    """An argparse type: comma-separated names, each one of `known` and given once -> a list in the given order."""

    def parse(text):
        names = [name.strip() for name in text.split(",")]
        for i, name in enumerate(names):
            if name not in known:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
            if name in names[:i]:
                raise argparse.ArgumentTypeError(f"{what} {name} is given twice")
        return names

    return parse


# Where the accuracy studies and benches write their tables by default: docs/results/<name>.md, <name>.json beside it.
RESULTS = os.path.join(ROOT, "docs", "results")
# A published table sits in its page between these two lines; the first names the JSON (beside the page) it was
# rendered from. tests/test_results_tables.py renders every such JSON again with its script's `render` and compares.
TABLE_START = "<!-- table from {} (rendered by its script; regenerate, do not edit) -->"
TABLE_START_RE = re.compile(r"^<!-- table from (\S+\.json) \(rendered by its script; regenerate, do not edit\) -->$")
TABLE_END = "<!-- end of table -->"


def json_beside(page):
    """The JSON of the table page `page`: x.md -> x.json (any other name: name + .json)."""
    return page[:-3] + ".json" if page.endswith(".md") else page + ".json"


def table_path(text):
    """An argparse type: --out of a result table, refused (utils.check_outputs) unless it and its JSON beside it
    can be written, so a long bench never fails at its last step; docs/results/ is made when missing."""
    in_results = os.path.dirname(os.path.abspath(text)) == RESULTS
    check_outputs({"--out": text, "--out (its .json)": json_beside(text)}, create=in_results)
    return text


def jsonable(value):
    """`value` with argparse namespaces, tuples and sets made JSON types (for the record of a run's options)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def in_repository(value):
    """A path inside the repository as a path relative to its root (so a record reads the same on any clone)."""
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(ROOT + os.sep):
        return os.path.relpath(value, ROOT)
    return value


def make_json_folder(out, json_name):
    """Make the folder of the JSON `json_name` of page `out` (a relative path from the page's folder), so a bench
    that calls this before its work cannot fail at its last step; -> the JSON's path."""
    path = os.path.join(os.path.dirname(os.path.abspath(out)), json_name)
    make_folder(os.path.dirname(path), "--out")
    return path


def publish(script, argv, args, runs, render, out, json_name=None):
    """Render the table of `runs` with `render(record)`, print it, and with `out` write the record (the command,
    the options, the runs) to the JSON beside the page `out` (`json_name` in its folder when a page holds several
    tables, else the page's name with .json) and the table into the page between its markers (a new page when
    `out` does not exist; the text around the markers is kept)."""
    script = os.path.relpath(os.path.abspath(script), ROOT)
    argv = sys.argv[1:] if argv is None else list(argv)
    options = {k: in_repository(v) for k, v in (jsonable(args) or {}).items()}
    record = {"command": shlex.join(["python", script, *argv]), "script": script, "args": options, "runs": runs}
    text = render(record)
    print(text)
    if not out:
        return record
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    json_name = json_name or os.path.basename(json_beside(out))
    with atomic_write(make_json_folder(out, json_name)) as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    region = f"{TABLE_START.format(json_name)}\n{text.rstrip()}\n{TABLE_END}\n"
    page = f"# {os.path.basename(out)[:-3]}\n\nRegenerate: `{record['command']}`\n\n{region}"
    if os.path.exists(out):
        with open(out) as handle:
            page = replace_table(handle.read(), json_name, region)
    with atomic_write(out) as handle:
        handle.write(page)
    return record


def replace_table(page, json_name, region):
    """`page` with the table rendered from `json_name` replaced by `region` (appended when it has none)."""
    lines = page.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == TABLE_START.format(json_name)), None)
    if start is None:
        return page.rstrip("\n") + "\n\n" + region
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip("\n") == TABLE_END)
    return "".join(lines[:start]) + region + "".join(lines[end + 1 :])


def published_tables(page_text):
    """[(json name, table text)] of every rendered table in a page's text."""
    found, lines = [], page_text.splitlines()
    for i, line in enumerate(lines):
        match = TABLE_START_RE.match(line)
        if match:
            end = lines.index(TABLE_END, i)
            found.append((match.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
    return found


# The timing benches' page: docs/performance.md, each bench's JSON in docs/results/perf/ (relative to the page).
PERF_PAGE = os.path.join(ROOT, "docs", "performance.md")


def perf_json(name):
    """The JSON of bench `name`'s table, relative to the page's folder: results/perf/<name>.json."""
    return os.path.join("results", "perf", f"{name}.json")


def out_perf(name, note=""):
    """--out of a timing bench: the page its table goes in, by default docs/performance.md."""
    text = f"page of the table (also printed; default docs/performance.md); its JSON in docs/results/perf/{name}.json"
    return {"--out": (table_path, PERF_PAGE, text + (note or " (results/perf/ beside the page)"))}


def seconds(value):
    """'6.96 s', '4.00 s', '0.0123 s', '3,639 s': three significant digits, thousands grouped."""
    return f"{value:,.0f} s" if value >= 100 else f"{value:#.3g} s"


def speed_ratio(baseline_s, ours_s):
    """'**2.10× faster**', '**2,231× faster**' (the baseline's time over ours), or '**1.50× slower**'."""
    x = max(baseline_s, ours_s) / min(baseline_s, ours_s)
    size = f"{x:,.0f}" if x >= 100 else f"{x:.2f}"
    return f"**{size}× {'faster' if baseline_s >= ours_s else 'slower'}**"


# --ncoef of the benches that make random speech features.
NCOEF_OPTION = {"--ncoef": (at_least(1), 30, "coefficients per frame (default 30)")}
# --repeats: how often each measurement is timed.
REPEATS = {"--repeats": (at_least(1), 3, "timed runs per measurement; the best counts (3)")}
# --threads of the benches that start whole runs (train.py, eval.py, ...) as subprocesses.
RUN_THREADS = {"--threads": (at_least(1), 2, "OMP threads of each run (default 2)")}
# --fonts: the font set of the benches that train on fonts.
FONTS = {"--fonts": (str, "runs/fonts32", "font set folder; built with tools/font_set.py if missing")}


def out_table(name):
    """--out of a study that writes a result table (publish), by default docs/results/`name`.md."""
    default = os.path.join(RESULTS, name + ".md")
    text = f"page of the table (also printed; default docs/results/{name}.md; its JSON beside it, {name}.json)"
    return {"--out": (table_path, default, text)}


# --device, --repeats and --threads, common to every bench script that times torch code.
DEVICE = {
    "--device": dict(help="cpu, cuda or cuda:N (default cuda when available)"),
    **REPEATS,
    "--threads": (at_least(1), None, "torch CPU threads (default: torch's choice)"),
}


def setup(args):
    """The device the arguments name (see utils.choose_device), with the thread count applied."""
    from utils import choose_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return choose_device(args.device)


def start(parser, argv):
    """The start of a timing bench's main: -> (parsed `argv`, the device they name, set up)."""
    args = parser.parse_args(argv)
    return args, setup(args)


def sync(device):
    """Wait for queued GPU work, so wall-clock times are complete (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats=3, warmup=1):
    """Call `fn` `warmup` times untimed, then `repeats` times; -> (best seconds, result of the last call)."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def best_times(fns, device, repeats=3, warmup=1):
    """Time several callables round-robin (a drifting machine load hits them alike): {name: fn} ->
    {name: (best seconds, result of the last call)}."""
    out = {name: best_time(fn, device, 0, warmup) for name, fn in fns.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, result = best_time(fn, device, 1, 0)
            out[name] = (min(out[name][0], seconds), result)
    return out


def describe(device):
    """One line naming the device and the torch build, printed first by every bench."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return f"device {device}: {name}; torch {torch.__version__}"


def ratio_line(what, candidate_s, baseline_name, baseline_s):
    """'what: 0.123 s vs baseline 0.456 s -> 3.71x' (the baseline time over the candidate's)."""
    return f"{what}: {candidate_s:.4f} s vs {baseline_name} {baseline_s:.4f} s -> {baseline_s / candidate_s:.2f}x"


def make_kaldi_features(folder, speakers, utts_per_speaker, frames, ncoef, seed=0):
    """Write random features as Kaldi files in `folder`: feats.ark + feats.scp, utt2spk, spk2utt.

    Utterance lengths vary uniformly in [frames/2, frames]. Returns the ark path.
    """
    import kaldiio
    import numpy as np

    rng = np.random.default_rng(seed)
    ark, scp = os.path.join(folder, "feats.ark"), os.path.join(folder, "feats.scp")
    spk2utt = {f"spk{s:04d}": [f"spk{s:04d}-utt{u:03d}" for u in range(utts_per_speaker)] for s in range(speakers)}
    with kaldiio.WriteHelper(f"ark,scp:{ark},{scp}") as writer:
        for utts in spk2utt.values():
            for utt in utts:
                length = int(rng.integers(frames // 2, frames + 1))
                writer(utt, rng.standard_normal((length, ncoef), dtype=np.float32))
    with open(os.path.join(folder, "spk2utt"), "w") as handle:
        handle.writelines(f"{spk} {' '.join(utts)}\n" for spk, utts in spk2utt.items())
    with open(os.path.join(folder, "utt2spk"), "w") as handle:
        handle.writelines(f"{utt} {spk}\n" for spk, utts in spk2utt.items() for utt in utts)
    return ark


def kaldi_to_hdf5(folder, out_name="train.hdf"):
    """Convert `folder`'s feats.scp (+ spk2utt / utt2spk) to the training HDF5 `folder`/`out_name`, as
    data_prep.py does for Kaldi features (every speaker kept, no CMN); -> the HDF5 path."""
    from e2e_verification import speech_data

    source = speech_data.KaldiFeatures(speech_data.list_scp_files(os.path.join(folder, "feats.scp")))
    spk2utt, utt2spk = speech_data.speaker_info(folder)
    out_file = os.path.join(folder, out_name)
    speech_data.write_training_data(out_file, [source], utt2spk, set(spk2utt))
    return out_file


# ----------------------------------------------------------------------------- the accuracy benches' runs
# The learned-distance variants the accuracy benches compare: train.py flags of each.
VARIANTS = {
    "concat": [],  # the research code's distance: train.py's default, no flag
    **{name: ["--pair-features", name] for name in PAIR_FEATURES if name != "concat"},
    "concat-norm": ["--distance-norm"],
    "sym-detach": ["--pair-features", "sym", "--detach-distance"],
}


def recipe(name):
    """The train.py flags of recipes/`name`.args as a list: each line a flag and its value, shell-quoted ("--lr
    0.05"); '#' starts a comment. The same file runs by hand as `python train.py @recipes/<name>.args ...`."""
    with open(os.path.join(ROOT, "recipes", name + ".args")) as handle:
        return [word for line in handle for word in shlex.split(line, comments=True)]


# A small image recipe for 2 CPU cores: a narrow pre-activation ResNet-18, the plateau schedule.
IMAGE_RECIPE = recipe("image_small")
# --seeds of the benches that repeat runs over seeds: a sorted list of ints.
SEEDS_OPTION = {"--seeds": (int_list(), "1,2,3", "seeds of the runs, e.g. 1,2,3 or 1-3 (default 1,2,3)")}
# --variants of the accuracy benches: a list of VARIANTS' names.
VARIANT_OPTION = {
    "--variants": (
        name_list(VARIANTS, "variant"),
        "concat,sym",
        "learned-distance variants, comma-separated, from: " + ", ".join(VARIANTS),
    )
}


def asterisk_folds(text):
    """An argparse type: folds of tools/asterisk_set.py --fold (one per speaker, 0..6) as int_list reads them."""
    from tools.asterisk_set import SPEAKER_FOLDERS

    return int_list(0, len({spk for spk, _ in SPEAKER_FOLDERS.values()}) - 1)(text)


def make_folder(path, flag):
    """Make folder `path` (and its parents) if missing: a UserError naming `flag` when it cannot be made."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot make the folder: {err.strerror or err}") from None
    return path


# The validation EERs a kept run's epoch can be chosen by (train.py --select-by).
SELECT_BY = ("e2e", "cos", "fus")


def chosen_checkpoint(cp, select_by):
    """(path, epoch, validation history) of the epoch of the run kept in folder `cp` whose validation EER of
    `select_by` is lowest (train_loop.best_epoch: the latest on ties; the last epoch when nothing was validated)."""
    from e2e_verification.checkpoints import load_checkpoint
    from e2e_verification.train_loop import CHECKPOINT_NAME, best_epoch

    epochs = sorted(int(m.group(1)) for m in map(CHECKPOINT_NAME.fullmatch, os.listdir(cp)) if m)
    if not epochs:
        raise UserError(f"{cp} holds no epoch checkpoint (checkpoint_<N>ep.pt)")
    history = load_checkpoint(os.path.join(cp, f"checkpoint_{epochs[-1]}ep.pt"))["history"]
    epoch = best_epoch(history, select_by) or epochs[-1]
    path = os.path.join(cp, f"checkpoint_{epoch}ep.pt")
    if not os.path.isfile(path):
        raise UserError(
            f"{cp}: epoch {epoch}, chosen by validation {select_by} EER, was not kept (--keep-checkpoints 0)"
        )
    return path, epoch, history


def recipe_name(text):
    """An argparse type: the name of a recipes/<name>.args file."""
    if not os.path.isfile(os.path.join(ROOT, "recipes", f"{text}.args")):
        raise argparse.ArgumentTypeError(f"no recipe recipes/{text}.args")
    return text


def check_json_name(name):
    """UserError unless --json-name (when given) is a file name ending in .json."""
    if name is not None and (os.path.basename(name) != name or not name.endswith(".json")):
        raise UserError(f"--json-name must be a file name ending in .json, got {name}")


def make_font_set(path):
    """Build the font set of the benches that train on fonts (tools/font_set.py, 40 test families) at `path`,
    unless it is there; its parent folders are made."""
    if not os.path.isdir(path):
        make_folder(os.path.dirname(os.path.abspath(path)), "--fonts")
        python("tools/font_set.py", "--out", path, "--test-families", "40")


def accuracy_parser(doc, example, runs, *recipes, files):
    """The parser of an accuracy bench: --threads; "what to run" (`runs`, --seeds and --variants); the
    `recipes` sections, each (title, table); and "files" (--fonts and `files`)."""
    what = ("what to run", {**runs, **SEEDS_OPTION, **VARIANT_OPTION})
    return make_parser(doc, example, RUN_THREADS, what, *recipes, ("files", {**FONTS, **files}))


def python(script, *argv, threads=2):
    """Run one of the toolkit's scripts in a subprocess (argument list, no shell); fail loudly. `threads`: its
    OMP_NUM_THREADS (None: the toolkit's own choice, as a user's command gets)."""
    env = {k: v for k, v in os.environ.items() if threads is not None or k not in ("OMP_NUM_THREADS", "E2E_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["nothing on stderr"]
        raise UserError(f"{script} failed ({done.returncode}): {last[0]}")
    return done.stdout


def metrics_of(json_path):
    """The "metrics" of a score file's JSON (eval.py or the digits demo writes it beside the scores)."""
    with open(json_path) as handle:
        return json.load(handle)["metrics"]


def children_cpu_seconds():
    """CPU seconds (user + system) of the finished subprocesses so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def mean_sd(values):
    """'mean ± sd' of the values to 4 decimals (the value alone when there is one)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
