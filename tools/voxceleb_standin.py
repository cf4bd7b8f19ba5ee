"""Build a tiny stand-in for VoxCeleb, laid out as the download, from Debian's Asterisk voice prompts.

Writes <out>/vox1/wav/<id1xxxx>/<video>/<nnnnn>.wav (VoxCeleb1: two "test" speakers id10270, id10271 and two
"dev" speakers id10001, id10002), <out>/vox1/vox1_meta.csv, <out>/vox2/wav/<id0xxxx>/<video>/<nnnnn>.wav
(VoxCeleb2 dev, as wav: training data and score-normalisation cohort) and the four official trial lists in
<out>/vox1/, in the official format (`1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav`):
veri_test.txt (Vox1-O: the test speakers), veri_test2.txt (Vox1-O cleaned), list_test_all2.txt (Vox1-E: every
vox1 speaker) and list_test_hard2.txt (Vox1-H: non-target pairs share the "nationality", here the language).
A speaker is one Asterisk voice, a "video" a group of its prompts; wav files are 16 kHz 16-bit mono (sox).
For testing recipes end to end, not for accuracy: 7 voices, each speaking one language (Allison two).
"""

import base64
import hashlib
import os
import random
import shutil
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.asterisk_set import SOUNDS, make_trials, scan_prompts
from utils import UserError, atomic_folder, check_output_folder, cli, make_parser

# Asterisk voice -> (VoxCeleb set, speaker id, gender, "nationality"). The Vox1-H lists pair speakers of one
# nationality; here that is the language, so each vox1 language holds two voices (French and Italian).
ROLES = {
    "carlo": ("vox1", "id10270", "m", "Italy", "test"),
    "paola": ("vox1", "id10271", "f", "Italy", "test"),
    "june": ("vox1", "id10001", "f", "France", "dev"),
    "armelle": ("vox1", "id10002", "f", "France", "dev"),
    "allison": ("vox2", "id00012", "f", "USA", "dev"),
    "july": ("vox2", "id00015", "f", "Colombia", "dev"),
    "ivrvoice": ("vox2", "id00017", "f", "Russia", "dev"),
}
ROLES_BY_ID = {spk: (voice, *rest) for voice, (_, spk, *rest) in ROLES.items()}  # id -> voice, gender, nation, set
TRIAL_LISTS = {  # official file name -> the list it stands in for
    "veri_test.txt": "Vox1-O",
    "veri_test2.txt": "Vox1-O cleaned",
    "list_test_all2.txt": "Vox1-E cleaned",
    "list_test_hard2.txt": "Vox1-H cleaned",
}
SAMPLE_RATE = 16000
GSM_FRAME = (33, 160, 8000)  # bytes, samples, rate of one GSM 6.10 frame as Asterisk stores it


def seconds(path):
    """The duration of a PCM wav or a raw GSM 6.10 prompt, read from its header or size."""
    if path.endswith(".gsm"):
        size, samples, rate = GSM_FRAME
        return os.path.getsize(path) // size * samples / rate
    try:
        with wave.open(path, "rb") as handle:
            return handle.getnframes() / handle.getframerate()
    except (wave.Error, EOFError):
        return 0.0


def video_id(spk, index, seed):
    """An 11-character YouTube-like id, fixed by the speaker, the group's index and the seed."""
    digest = hashlib.sha1(f"{spk}/{index}/{seed}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11]


def choose(prompts, videos, per_video, min_seconds, rng):
    """Per voice of ROLES, `videos` groups of `per_video` random prompts of at least `min_seconds`;
    -> dicts (src, voice, path), path = <set>/wav/<id>/<video>/<nnnnn>.wav, numbered across the speaker."""
    chosen = []
    for voice, (dataset, spk, *_) in sorted(ROLES.items()):
        own = [p for p in prompts if p["spk"] == voice and seconds(p["src"]) >= min_seconds]
        if len(own) < videos * per_video:
            raise UserError(f"voice {voice} has {len(own)} prompts of {min_seconds} s or more, "
                            f"{videos * per_video} needed; lower --videos or --utts-per-video")  # fmt: skip
        own = rng.sample(own, videos * per_video)
        ids = [video_id(spk, index, rng.random()) for index in range(videos)]
        for index, prompt in enumerate(own):
            path = os.path.join(dataset, "wav", spk, ids[index // per_video], f"{index + 1:05d}.wav")
            chosen.append({"src": prompt["src"], "voice": voice, "path": path})
    return chosen


def convert(chosen, folder, sox, jobs):
    """Write every chosen prompt as a 16 kHz 16-bit mono wav under `folder` (sox, no dither)."""

    def one(item):
        target = os.path.join(folder, item["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        cmd = [sox, "-q", "-D", item["src"], "-r", str(SAMPLE_RATE), "-b", "16", "-e", "signed-integer", "-c", "1",
               target]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise UserError(f"sox could not convert {item['src']}: {done.stderr.strip()}")

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        list(tqdm(pool.map(one, chosen), total=len(chosen), desc="wav files", unit="file", disable=None))
    finally:
        pool.shutdown(cancel_futures=True)


def trial_key(item):
    """How an official list names an utterance: <id>/<video>/<nnnnn>.wav."""
    return item["path"].split(os.sep, 2)[2]


def write_trials(path, trials):
    """One official line per trial: `1|0 enroll test`."""
    with open(path, "w") as handle:
        handle.writelines(f"{int(label == 'target')} {a} {b}\n" for a, b, label in trials)


def vox1_lists(vox1, n_trials, rng):
    """The four lists over the vox1 items: O (test speakers), O cleaned (O without the trials of one flagged
    utterance), E (every speaker) and H (non-targets of one nationality), E and H without the flagged one."""
    spk = {trial_key(i): ROLES[i["voice"]][1] for i in vox1}
    nation = {trial_key(i): ROLES[i["voice"]][3] for i in vox1}
    test = sorted(k for k in spk if ROLES_BY_ID[spk[k]][3] == "test")
    flagged = test[-1]
    o_list = make_trials(test, spk, n_trials, rng)
    keys = sorted(spk)
    e_list = make_trials([k for k in keys if k != flagged], spk, n_trials, rng)
    same_nation = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :] if nation[a] == nation[b]]
    hard = [(a, b) for a, b in same_nation if flagged not in (a, b)]
    targets = [(a, b, "target") for a, b in hard if spk[a] == spk[b]]
    nontargets = [(a, b, "nontarget") for a, b in hard if spk[a] != spk[b]]
    n = min(len(targets), len(nontargets), n_trials // 2)
    h_list = rng.sample(targets, n) + rng.sample(nontargets, n)
    rng.shuffle(h_list)
    return {
        "veri_test.txt": o_list,
        "veri_test2.txt": [t for t in o_list if flagged not in t[:2]],
        "list_test_all2.txt": e_list,
        "list_test_hard2.txt": h_list,
    }


def write_meta(path):
    """vox1_meta.csv as VoxCeleb1 ships it: id, name, gender, nationality, set (tab-separated)."""
    rows = ["VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"]
    for spk, (voice, gender, nation, subset) in sorted(ROLES_BY_ID.items()):
        if spk.startswith("id1"):
            rows.append(f"{spk}\t{voice.capitalize()}\t{gender}\t{nation}\t{subset}")
    with open(path, "w") as handle:
        handle.write("\n".join(rows) + "\n")


EXAMPLE = "example:\n  python tools/voxceleb_standin.py --out data/voxceleb_standin --videos 2 --utts-per-video 3"

OPTIONS = {
    "--out": dict(required=True, help="output folder (vox1/, vox2/); new or empty"),
    "--force": ("replace --out when it holds an earlier output of this tool (other folders are never replaced)",),
    "--sounds": dict(default=SOUNDS, help=f"Asterisk sounds folder (default {SOUNDS})"),
    "--videos": (int, 2, "videos (groups of prompts) per speaker (default 2)"),
    "--utts-per-video": (int, 3, "utterances per video (default 3)"),
    "--min-seconds": (float, 1.0, "leave out prompts shorter than this, in seconds (default 1.0)"),
    "--n-trials": (int, 200, "trials per list at most, half target, half non-target (default 200)"),
    "--seed": (int, 0, "seed of the prompt draw, the videos and the trials (default 0)"),
    "--jobs": (int, 2, "parallel sox conversions (default 2)"),
}


def check_args(args):
    """One-line errors for flag values and for --out, before any work; -> the absolute --out."""
    for flag, value, low in (("--videos", args.videos, 2), ("--utts-per-video", args.utts_per_video, 1),
                             ("--n-trials", args.n_trials, 2), ("--jobs", args.jobs, 1)):  # fmt: skip
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.min_seconds < 0:
        raise UserError(f"--min-seconds must be >= 0, got {args.min_seconds}")
    sounds = {"--sounds": args.sounds}
    return check_output_folder("--out", args.out, "voxceleb_standin", args.force, sounds, around=sounds, create=True)


def build_parser():
    return make_parser(__doc__, EXAMPLE, OPTIONS)


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = check_args(args)
    rng = random.Random(args.seed)
    prompts = scan_prompts(args.sounds)
    missing = sorted(set(ROLES) - {p["spk"] for p in prompts})
    if missing:
        raise UserError(f"no prompts of the voice(s) {', '.join(missing)} under {args.sounds}")
    chosen = choose(prompts, args.videos, args.utts_per_video, args.min_seconds, rng)
    sox = shutil.which("sox")  # every file is resampled to 16 kHz
    if sox is None:
        raise UserError("the prompts are resampled with sox: apt-get install sox")
    with atomic_folder(out, "voxceleb_standin") as tmp:
        convert(chosen, tmp, sox, args.jobs)
        lists = vox1_lists([c for c in chosen if c["path"].startswith("vox1")], args.n_trials, rng)
        for name, trials in lists.items():
            write_trials(os.path.join(tmp, "vox1", name), trials)
        write_meta(os.path.join(tmp, "vox1", "vox1_meta.csv"))
    for name, trials in lists.items():
        n_target = sum(label == "target" for *_, label in trials)
        print(f"{TRIAL_LISTS[name]:<16}{name:<22}{len(trials):>6} trials ({n_target} target)")
    n_vox2 = sum(c["path"].startswith("vox2") for c in chosen)
    print(f"wrote {len(chosen) - n_vox2} vox1 and {n_vox2} vox2 utterances to {out}")
    return 0


if __name__ == "__main__":
    cli(main)
