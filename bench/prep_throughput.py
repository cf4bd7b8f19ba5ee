"""data_prep.py throughput: Kaldi feats.scp/ark -> training HDF5, against reading the same ark bytes.

Random features are written as a real Kaldi ark/scp with speaker tables; data_prep's conversion
(speech_data.write_training_data over the scp, benchlib.kaldi_to_hdf5) turns them into the HDF5 the
training loader reads. Baselines: reading the ark's bytes (the I/O floor, page cache warm) and parsing
every matrix with kaldiio alone (no HDF5 writing).
"""

import os
import tempfile

import benchlib
import kaldiio
import torch
from benchlib import (
    at_least,
    seconds,  # noqa: E402
)

from utils import cli

EXAMPLE = """example:
  python bench/prep_throughput.py --speakers 100 --utts 20 --frames 400"""


def read_bytes(path, block=1 << 24):
    """Read a file in 16 MB blocks; -> bytes read."""
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            total += len(chunk)
    return total


def parse_matrices(scp):
    """Load every matrix of a feats.scp with kaldiio; -> number of matrices."""
    return sum(1 for _ in kaldiio.load_scp_sequential(scp))


OPTIONS = {
    "--speakers": (at_least(1), 100, "speakers (default 100)"),
    "--utts": (at_least(1), 20, "utterances per speaker (default 20)"),
    "--frames": (at_least(2), 400, "longest utterance in frames, at least 2 (default 400)"),
    "--work-dir": (str, None, "folder for the features and the HDF5 (default: a temporary one)"),
    **benchlib.out_perf("prep_throughput"),
}
JSON_NAME = benchlib.perf_json("prep_throughput")


# The conversion's floors (the baselines), each with its key in the run.
FLOORS = (("reading the ark's bytes alone", "read_s"), ("parsing the matrices with kaldiio alone", "parse_s"))


def render(record):
    """Markdown: the rows of the performance table (what and command, ours, baseline, ratio), one per baseline:
    the conversion takes longer than either floor, the ratio says how many times."""
    lines = ["| what (command) | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in record["runs"]:
        what = (
            f"data_prep's Kaldi-features conversion to the training HDF5, {r['utterances']:,} utterances "
            f"({r['megabytes']:.1f} MB of features) — `{record['command']}`"
        )
        ours = f"{seconds(r['prep_s'])} ({r['utterances'] / r['prep_s']:,.0f} utterances/s)"
        for floor, key in FLOORS:
            times = f"{r['prep_s'] / r[key]:.1f}× the floor's time"
            lines.append(f"| {what} | {ours} | {floor}: {seconds(r[key])} | {times} |")
    return "\n".join(lines) + "\n"


def build_parser():
    return benchlib.make_parser(__doc__, EXAMPLE, OPTIONS, benchlib.NCOEF_OPTION, benchlib.REPEATS)


def run(args, folder):
    """Time the conversion and its two floors in `folder`, print them; -> the run for the table."""
    cpu = torch.device("cpu")
    ark = benchlib.make_kaldi_features(folder, args.speakers, args.utts, args.frames, args.ncoef)
    scp = os.path.join(folder, "feats.scp")
    megabytes = os.path.getsize(ark) / 1e6
    n_utts = args.speakers * args.utts
    print(f"{n_utts} utterances of {args.ncoef} coefficients, ark {megabytes:.1f} MB")
    prep_s, _ = benchlib.best_time(lambda: benchlib.kaldi_to_hdf5(folder), cpu, args.repeats)
    read_s, _ = benchlib.best_time(lambda: read_bytes(ark), cpu, args.repeats)
    parse_s, _ = benchlib.best_time(lambda: parse_matrices(scp), cpu, args.repeats)
    for name, took in (("data_prep.py", prep_s), ("read ark bytes", read_s), ("kaldiio parse", parse_s)):
        print(f"{name}: {took:.4f} s ({megabytes / took:.1f} MB/s, {n_utts / took:.0f} utt/s)")
    print(f"data_prep takes {prep_s / read_s:.1f}x the time of reading the ark bytes")
    print(f"data_prep takes {prep_s / parse_s:.1f}x the time of kaldiio parsing alone")
    return dict(utterances=n_utts, ncoef=args.ncoef, megabytes=megabytes, prep_s=prep_s, read_s=read_s, parse_s=parse_s)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.out:  # the JSON's folder, made before the work (the page's own folder is checked while parsing)
        benchlib.make_json_folder(args.out, JSON_NAME)
    if args.work_dir:
        measured = run(args, benchlib.make_folder(args.work_dir, "--work-dir"))
    else:
        with tempfile.TemporaryDirectory() as folder:
            measured = run(args, folder)
    benchlib.publish(__file__, argv, args, [measured], render, args.out, JSON_NAME)
    return 0


if __name__ == "__main__":
    cli(main)
