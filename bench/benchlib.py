"""Shared bits of the bench scripts: the repository root on sys.path, their command line, a synchronised
timer, ratio lines and the written results.

Every bench script times a candidate against a baseline in the same run, on the same device, and
prints the ratio; absolute numbers depend on the machine, ratios much less.
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# make_parser(doc, example, *tables): a bench's parser, as every script's.
from utils import atomic_write, make_parser  # noqa: E402, F401

# --repeats: how often each measurement is timed.
REPEATS = {"--repeats": (int, 3, "timed runs per measurement; the best counts (3)")}
# --threads of the benches that start whole runs (train.py, eval.py, ...) as subprocesses.
RUN_THREADS = {"--threads": (int, 2, "OMP threads of each run (default 2)")}
# --fonts: the font set of the benches that train on fonts.
FONTS = {"--fonts": (str, "runs/fonts32", "font set folder; built with tools/font_set.py if missing")}
# --out of the benches that write a result table (benchlib.write_results).
OUT_TABLE = {"--out": (str, None, "markdown table file (also printed); a .json of every run beside it")}
# --device, --repeats and --threads, common to every bench script that times torch code.
DEVICE = {
    "--device": dict(help="cpu, cuda or cuda:N (default cuda when available)"),
    **REPEATS,
    "--threads": (int, None, "torch CPU threads (default: torch's choice)"),
}


def setup(args):
    """The device the arguments name (see utils.choose_device), with the thread count applied."""
    from utils import choose_device

    if args.threads:
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


def write_results(text, runs, out):
    """Print the markdown table `text`; with `out`, also write it there and the list `runs` to `out`.json."""
    print(text)
    if out:
        with atomic_write(out) as handle:
            handle.write(text)
        with atomic_write(out + ".json") as handle:
            json.dump(runs, handle, indent=1)


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
