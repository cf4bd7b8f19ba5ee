"""Stage 1 of the VoxCeleb recipe: Kaldi lists and trials from the folders as downloaded.

Reads <data>/vox1/wav/<id>/<video>/<nnnnn>.wav, <data>/vox2/wav/<id>/<video>/<nnnnn>.wav and the official trial
lists in <trials-dir> (default <data>/vox1/); writes into --out (atomically): vox1/ and vox2/ (wav.scp, utt2spk,
spk2utt; utterance ids <id>-<video>-<nnnnn>, as Kaldi's VoxCeleb recipe names them) and trials/ (eval.py's
`enroll test target|nontarget`): vox1_O, vox1_O_cleaned, vox1_E_cleaned, vox1_H_cleaned, and vox1_dev, the
Vox1-E trials between speakers outside Vox1-O, a held-out list for calibration, and vox1_all, every trial of
the four lists once (eval.py scores it in one run; local/eer_table.py splits the scores by list).
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from e2e_verification import speech_data
from utils import UserError, atomic_folder, check_output_folder, cli, make_parser

TRIAL_LISTS = {  # eval.py trials name -> official file
    "vox1_O": "veri_test.txt",
    "vox1_O_cleaned": "veri_test2.txt",
    "vox1_E_cleaned": "list_test_all2.txt",
    "vox1_H_cleaned": "list_test_hard2.txt",
}
CALIBRATION_LIST = "vox1_dev"
ALL_LISTS = "vox1_all"
WAV_PATH = re.compile(r"id\d{5}/[^/]+/\d{5}\.wav")
LAYOUT = "<set>/wav/idNNNNN/<video>/<nnnnn>.wav"


def utt_id(key):
    """The Kaldi utterance id of an official name `id10270/x6uYqmx31kE/00001.wav`: id10270-x6uYqmx31kE-00001."""
    return key[: -len(".wav")].replace("/", "-")


def scan_wavs(data, subset):
    """{official name: absolute path} of every wav under <data>/<subset>/wav/; a file off the layout is refused."""
    root = os.path.join(data, subset, "wav")
    if not os.path.isdir(root):
        raise UserError(f"{data} is not laid out as VoxCeleb: {root} is missing (expected {LAYOUT})")
    found = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            key = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if not WAV_PATH.fullmatch(key):
                hint = " (convert VoxCeleb2's m4a to 16 kHz wav first)" if name.endswith(".m4a") else ""
                raise UserError(f"{os.path.join(root, key)} is off the VoxCeleb layout {LAYOUT}{hint}")
            found[key] = os.path.abspath(os.path.join(dirpath, name))
    if not found:
        raise UserError(f"no wav files under {root} (expected {LAYOUT})")
    return found


def read_official(path, known):
    """The trials of an official list (`1|0 enroll test`, names as in `known`) as eval.py rows."""
    if not os.path.isfile(path):
        raise UserError(f"missing trial list {path}")
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            fields = line.split()
            if len(fields) != 3 or fields[0] not in ("0", "1"):
                raise UserError(f"{path} line {number}: expected `1|0 id/video/nnnnn.wav id/video/nnnnn.wav`")
            for key in fields[1:]:
                if key not in known:
                    raise UserError(f"{path} line {number}: {key} is not under the vox1 wav folder")
            rows.append((utt_id(fields[1]), utt_id(fields[2]), "target" if fields[0] == "1" else "nontarget"))
    if not rows:
        raise UserError(f"trial list {path} is empty")
    return rows


def calibration_trials(e_trials, o_trials):
    """The Vox1-E trials whose speakers are all outside Vox1-O: held out from every O list."""
    o_speakers = {utt.split("-", 1)[0] for a, b, _ in o_trials for utt in (a, b)}
    rows = [t for t in e_trials if not {t[0].split("-", 1)[0], t[1].split("-", 1)[0]} & o_speakers]
    if len({label for *_, label in rows}) < 2:
        raise UserError("Vox1-E has no target and non-target trials between speakers outside Vox1-O to calibrate on")
    return rows


def union(lists):
    """Every trial of the eval lists once (eval.py then embeds each vox1 utterance once for all of them)."""
    rows = {}
    for name in TRIAL_LISTS:
        for enroll, test, label in lists[name]:
            if rows.setdefault((enroll, test), label) != label:
                raise UserError(f"the trial {enroll} {test} is a target in one list and a non-target in another")
    return [(*pair, label) for pair, label in rows.items()]


def write_set(folder, wavs):
    """wav.scp, utt2spk and spk2utt of {official name: path} into `folder`."""
    os.makedirs(folder)
    ids = {utt_id(key): path for key, path in wavs.items()}
    speech_data.write_table(os.path.join(folder, "wav.scp"), sorted(ids.items()))
    speech_data.write_speaker_tables(folder, {utt: utt.split("-", 1)[0] for utt in ids})


EXAMPLE = "example:\n  python recipes/voxceleb/local/prepare_lists.py --data /data/voxceleb --out exp/voxceleb/data"

OPTIONS = {
    "--data": dict(required=True, help="VoxCeleb folder holding vox1/wav/ and vox2/wav/"),
    "--trials-dir": dict(default=None, help="folder of the official trial lists (default <data>/vox1)"),
    "--out": dict(required=True, help="output folder; an earlier output of this command is replaced"),
}


def main(argv=None):
    args = make_parser(__doc__, EXAMPLE, OPTIONS).parse_args(argv)
    trials_dir = args.trials_dir or os.path.join(args.data, "vox1")
    inputs = {"--data": args.data, "--trials-dir": trials_dir}
    out = check_output_folder("--out", args.out, "voxceleb_lists", True, inputs, around=inputs, create=True)
    vox1, vox2 = scan_wavs(args.data, "vox1"), scan_wavs(args.data, "vox2")
    lists = {name: read_official(os.path.join(trials_dir, file), vox1) for name, file in TRIAL_LISTS.items()}
    lists[CALIBRATION_LIST] = calibration_trials(lists["vox1_E_cleaned"], lists["vox1_O"])
    lists[ALL_LISTS] = union(lists)
    with atomic_folder(out, "voxceleb_lists") as tmp:
        write_set(os.path.join(tmp, "vox1"), vox1)
        write_set(os.path.join(tmp, "vox2"), vox2)
        os.makedirs(os.path.join(tmp, "trials"))
        for name, rows in lists.items():
            speech_data.write_table(os.path.join(tmp, "trials", name), rows)
    print(f"vox1: {len(vox1)} utterances, vox2: {len(vox2)} utterances; trials: "
          + ", ".join(f"{name} {len(rows)}" for name, rows in lists.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    cli(main)
