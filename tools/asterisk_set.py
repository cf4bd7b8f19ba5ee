"""Build a small real speech set (Kaldi data dirs + trials) from Debian's Asterisk voice-prompt packages.

About 3,900 telephone prompts (8 kHz) by 7 speakers, from the packages asterisk-core-sounds-{en,es,fr,it,ru}-wav,
asterisk-prompt-es-co, asterisk-prompt-fr-armelle and asterisk-prompt-it-menardi-wav. Speaker and language go
together here (one language per speaker, except Allison, who records both the English and the Mexican-Spanish
core prompts), so any EER on this set measures speaker and language discrimination at once.
"""

import hashlib
import os
import random
import shutil
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from e2e_verification import speech_data
from e2e_verification.metrics import compute_eer
from utils import UserError, atomic_folder, check_output_folder, cli, make_parser

SOUNDS = "/usr/share/asterisk/sounds"

# Real folder -> (speaker id, language). Read from the packages' copyright files; the top-level en, en_US,
# it, it_IT, ru, ru_RU entries are symlinks (via /etc/alternatives) into these folders and digits/,
# dictate/, letters/, phonetic/ only hold symlinks into es/ and fr/, so resolving real paths removes them.
SPEAKER_FOLDERS = {
    "en_US_f_Allison": ("allison", "en"),  # Allison Smith, core prompts
    "es_MX_f_Allison": ("allison", "es"),  # Allison Smith again: the core Mexican-Spanish prompts are hers too
    "fr_CA_f_June": ("june", "fr"),  # June Wallack, core Canadian-French prompts
    "it_IT_m_Carlo": ("carlo", "it"),  # Carlo Flora, core Italian prompts
    "it_IT_f_Menardi": ("paola", "it"),  # Paola Dal Zot, the voice of Marco Menardi's Italian prompts
    "ru_RU_f_IvrvoiceRU": ("ivrvoice", "ru"),  # the female voice of ivrvoice.ru, core Russian prompts
    "es": ("july", "es"),  # July E. Jimenez, Colombian Spanish (asterisk-prompt-es-co), GSM 6.10
    "fr": ("armelle", "fr"),  # Armelle Desjardins, French (asterisk-prompt-fr-armelle), GSM 6.10
}
# Recordings that are not speech: tones and the silence/ folders.
NOT_SPEECH = {"beep", "beeperr", "ascending-2tone", "descending-2tone"}
AUDIO_EXTENSIONS = (".wav", ".gsm")
MIN_SECONDS = 0.1


def scan_prompts(root=SOUNDS):
    """List the speech prompts under `root` as dicts (utt, spk, lang, src), one per distinct recording.

    Files are deduplicated by real path (symlinked folders) and by content (a few prompts are shipped
    twice under two names); silence and tones are left out. Utterance ids are `<spk>-<lang>-<path>`.
    """
    if not os.path.isdir(root):
        raise UserError(f"Asterisk sounds not found at {root}; install the asterisk-core-sounds-*-wav packages")
    prompts, seen_paths, seen_content = [], set(), set()
    for folder, (spk, lang) in sorted(SPEAKER_FOLDERS.items()):
        base = os.path.realpath(os.path.join(root, folder))
        if not os.path.isdir(base):
            continue
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != "silence")
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                path = os.path.realpath(os.path.join(dirpath, name))
                if ext not in AUDIO_EXTENSIONS or stem in NOT_SPEECH or path in seen_paths:
                    continue
                seen_paths.add(path)
                with open(path, "rb") as handle:
                    digest = hashlib.sha1(handle.read()).hexdigest()
                if digest in seen_content:
                    continue
                seen_content.add(digest)
                rel = os.path.relpath(os.path.join(dirpath, stem), base).replace(os.sep, "-")
                utt = f"{spk}-{lang}-" + "".join(c if c.isalnum() or c in "_.-" else "_" for c in rel)
                prompts.append({"utt": utt, "spk": spk, "lang": lang, "src": path})
    if not prompts:
        raise UserError(f"no Asterisk prompts found under {root}")
    assert len({p["utt"] for p in prompts}) == len(prompts), "utterance ids must be unique"
    return prompts


def subsample(prompts, max_per_speaker, rng):
    """Keep at most `max_per_speaker` random prompts per speaker (all when it is 0), in scan order."""
    if max_per_speaker == 0:
        return prompts
    by_spk = {}
    for index, prompt in enumerate(prompts):
        by_spk.setdefault(prompt["spk"], []).append(index)
    keep = set()
    for indices in by_spk.values():
        keep.update(rng.sample(indices, min(max_per_speaker, len(indices))))
    return [prompt for index, prompt in enumerate(prompts) if index in keep]


def check_sox(prompts):
    """UserError when some prompts are GSM and sox, which decodes them, is not installed; -> sox's path."""
    sox = shutil.which("sox")
    if sox is None and any(p["src"].endswith(".gsm") for p in prompts):
        raise UserError("the GSM prompts need sox to be decoded: apt-get install sox")
    return sox


def materialise(prompts, folder, final_folder, sox, jobs=2):
    """Give every prompt a 16-bit PCM wav under `folder`/wav/<spk>/: a symlink for wav sources, a sox decode for
    GSM; each prompt's "wav" is its path under `final_folder`, where `folder` is put when complete.

    Returns the prompts that hold at least MIN_SECONDS of audio (one Russian prompt is an empty file).
    """
    names = {p["utt"]: os.path.join("wav", p["spk"], p["utt"] + ".wav") for p in prompts}

    def one(prompt):
        target = os.path.join(folder, names[prompt["utt"]])
        if prompt["src"].endswith(".wav"):
            os.symlink(prompt["src"], target)
        else:
            cmd = [sox, "-q", prompt["src"], "-b", "16", "-e", "signed-integer", "-c", "1", target]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise UserError(f"sox could not decode {prompt['src']}: {done.stderr.strip()}")
        try:
            with wave.open(target, "rb") as handle:
                prompt["seconds"] = handle.getnframes() / handle.getframerate()
        except (wave.Error, EOFError) as err:
            raise UserError(f"{prompt['src']} is not a PCM wav file: {err}") from None

    for spk in {p["spk"] for p in prompts}:
        os.makedirs(os.path.join(folder, "wav", spk), exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        list(tqdm(pool.map(one, prompts), total=len(prompts), desc="wav files", unit="file", disable=None))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C no further file is started
    for prompt in prompts:
        prompt["wav"] = os.path.join(final_folder, names[prompt["utt"]])
        if prompt["seconds"] < MIN_SECONDS:
            print(f"left out {prompt['src']}: {prompt['seconds']:.2f} s of audio")
            os.remove(os.path.join(folder, names[prompt["utt"]]))
    return [prompt for prompt in prompts if prompt["seconds"] >= MIN_SECONDS]


def fold_speakers(speakers, fold):
    """The 2 held-out speakers of fold `fold` (0..n-1) of sorted `speakers`: the fold-th and the next (cyclically),
    so every speaker is held out in two of the n folds and every fold has non-target trials."""
    if not 0 <= fold < len(speakers):
        raise UserError(f"--fold must be in 0..{len(speakers) - 1} ({len(speakers)} speakers), got {fold}")
    return {speakers[fold], speakers[(fold + 1) % len(speakers)]}


def split(prompts, n_test_speakers, valid_fraction, rng, test_speakers=None):
    """Assign each prompt a set: held-out `test` speakers (`test_speakers`, or `n_test_speakers` drawn at
    random), and train/valid utterances of the other speakers."""
    speakers = sorted({p["spk"] for p in prompts})
    if test_speakers is not None:
        unknown = sorted(set(test_speakers) - set(speakers))
        if unknown:
            raise UserError(f"unknown test speaker {unknown[0]}; speakers: {', '.join(speakers)}")
        if len(speakers) - len(test_speakers) < 2:
            raise UserError("at least 2 speakers must remain for training")
        test = set(test_speakers)
    else:
        test = set(rng.sample(speakers, n_test_speakers)) if len(speakers) >= n_test_speakers + 2 else set()
    for spk in speakers:
        own = [p for p in prompts if p["spk"] == spk]
        if spk in test:
            for prompt in own:
                prompt["set"] = "test"
            continue
        rng.shuffle(own)
        n_valid = max(1, round(valid_fraction * len(own))) if len(own) > 1 else 0
        for index, prompt in enumerate(own):
            prompt["set"] = "valid" if index < n_valid else "train"


def make_trials(utts, utt2spk, n_trials, rng):
    """Balanced trials over `utts`: up to n_trials/2 random target and as many non-target pairs, shuffled."""
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1 :]]
    target = [pair for pair in pairs if utt2spk[pair[0]] == utt2spk[pair[1]]]
    nontarget = [pair for pair in pairs if utt2spk[pair[0]] != utt2spk[pair[1]]]
    n = min(len(target), len(nontarget), n_trials // 2)
    trials = [(*pair, "target") for pair in rng.sample(target, n)]
    trials += [(*pair, "nontarget") for pair in rng.sample(nontarget, n)]
    rng.shuffle(trials)
    return trials


def write_data_dir(folder, prompts):
    """Write a Kaldi data dir (wav.scp, utt2spk, spk2utt, utt2lang) for `prompts` into `folder`."""
    os.makedirs(folder, exist_ok=True)
    prompts = sorted(prompts, key=lambda p: p["utt"])
    speech_data.write_table(os.path.join(folder, "wav.scp"), ((p["utt"], p["wav"]) for p in prompts))
    speech_data.write_table(os.path.join(folder, "utt2lang"), ((p["utt"], p["lang"]) for p in prompts))
    speech_data.write_speaker_tables(folder, {p["utt"]: p["spk"] for p in prompts})


def utterance_stats(feats):
    """Mean and standard deviation over frames of (frames, ncoef) features, concatenated: (2 * ncoef,)."""
    return np.concatenate([feats.mean(axis=0), feats.std(axis=0)])


def stats_cosine_eer(wav_paths, speakers, ncoef=30):
    """The no-training floor: all-pairs EER of cosine scores between per-utterance MFCC mean/std vectors."""
    stats = []
    for path in tqdm(wav_paths, desc="floor MFCC", unit="utt", disable=None):
        samples, rate = speech_data.read_wav(path)
        feats = speech_data.compute_mfcc(samples, rate, ncoef)
        if len(feats) == 0:
            raise UserError(f"{path} is too short for one MFCC frame")
        stats.append(utterance_stats(feats))
    emb = np.stack(stats).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    upper = np.triu_indices(len(emb), k=1)
    scores = (emb @ emb.T)[upper]
    labels = np.asarray(speakers)[upper[0]] == np.asarray(speakers)[upper[1]]
    return compute_eer(scores, labels)


EXAMPLE = "example:\n  python tools/asterisk_set.py --out data/asterisk --max-per-speaker 40 --seed 1"

# The builder's flags (see utils.add_options).
OPTIONS = {
    "--out": dict(required=True, help="output folder (wav/, train/, valid/, test/, all/); new or empty"),
    "--force": ("replace --out when it holds an earlier output of this tool (other folders are never replaced)",),
    "--sounds": dict(default=SOUNDS, help=f"Asterisk sounds folder (default {SOUNDS})"),
    "--max-per-speaker": (int, 0, "keep at most this many random prompts per speaker, at least 2 (default 0: all)"),
    "--seed": (int, 0, "seed of subsampling, split and trials (default 0)"),
    "--n-test-speakers": (int, 2, "speakers held out for test, when at least 2 remain for training (default 2)"),
    "--test-speakers": dict(help="comma-separated speakers to hold out for test (overrides --n-test-speakers)"),
    "--fold": (
        int,
        None,
        "hold out the fold-th and the next speaker in sorted order (0..6): 7 folds cover every speaker twice",
    ),
    "--valid-fraction": (
        float,
        0.1,
        "fraction of each training speaker's prompts held out for validation (default 0.1)",
    ),
    "--n-trials": (int, 20000, "trials in test/trials, half target, half non-target, at most (default 20000)"),
    "--jobs": (int, 2, "parallel sox decodes (default 2)"),
    "--no-floor": ("skip the MFCC-statistics cosine floor EER",),
}


def build_parser():
    """The command line of the Asterisk set builder."""
    return make_parser(__doc__, EXAMPLE, OPTIONS)


def check_args(args):
    """One-line errors for flag values a user can get wrong and for --out, before any work; -> the absolute --out."""
    if not 0 <= args.valid_fraction < 1:
        raise UserError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    for flag, value, low in (("--jobs", args.jobs, 1), ("--n-test-speakers", args.n_test_speakers, 0),
                             ("--n-trials", args.n_trials, 2)):  # fmt: skip
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.max_per_speaker < 0 or args.max_per_speaker == 1:
        raise UserError(f"--max-per-speaker must be 0 (all) or at least 2, got {args.max_per_speaker}")
    sounds = {"--sounds": args.sounds}  # neither holding the recordings nor among them
    return check_output_folder("--out", args.out, "asterisk_set", args.force, sounds, around=sounds, create=True)


def write_lists(folder, prompts, rng, n_trials):
    """Write all/, train/, valid/ and test/ (the sets that have prompts) and test/trials into `folder`; -> trials."""
    write_data_dir(os.path.join(folder, "all"), prompts)
    for name in ("train", "valid", "test"):
        subset = [p for p in prompts if p["set"] == name]
        if subset:
            write_data_dir(os.path.join(folder, name), subset)
    utt2spk = {p["utt"]: p["spk"] for p in prompts if p["set"] == "test"}
    if not utt2spk:
        return []
    trials = make_trials(sorted(utt2spk), utt2spk, n_trials, rng)
    if not any(label == "target" for *_, label in trials):
        raise UserError("the test speakers have one prompt each: no target trial; raise --max-per-speaker")
    speech_data.write_table(os.path.join(folder, "test", "trials"), trials)
    return trials


def print_counts(prompts):
    """The table of prompts per speaker and set."""
    print(f"{'speaker':<10}{'lang':<8}{'train':>7}{'valid':>7}{'test':>7}")
    for spk in sorted({p["spk"] for p in prompts}):
        own = [p for p in prompts if p["spk"] == spk]
        langs = ",".join(sorted({p["lang"] for p in own}))
        counts = [sum(p["set"] == name for p in own) for name in ("train", "valid", "test")]
        print(f"{spk:<10}{langs:<8}" + "".join(f"{c:>7}" for c in counts))


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = check_args(args)
    rng = random.Random(args.seed)
    prompts = subsample(scan_prompts(args.sounds), args.max_per_speaker, rng)
    test_speakers = args.test_speakers.split(",") if args.test_speakers else None
    if args.fold is not None:
        test_speakers = sorted(fold_speakers(sorted({p["spk"] for p in prompts}), args.fold))
    if test_speakers is not None:  # checked before any file is written
        split([dict(p) for p in prompts], args.n_test_speakers, args.valid_fraction, random.Random(0), test_speakers)
    sox = check_sox(prompts)
    with atomic_folder(out, "asterisk_set") as tmp:
        prompts = materialise(prompts, tmp, out, sox, args.jobs)
        split(prompts, args.n_test_speakers, args.valid_fraction, rng, test_speakers)
        trials = write_lists(tmp, prompts, rng, args.n_trials)
    print_counts(prompts)
    if not trials:
        print(f"too few speakers for a held-out test set: no trials written; wrote {out}")
        return 0
    print(f"wrote {len(trials)} balanced trials to {os.path.join(out, 'test', 'trials')}")
    if not args.no_floor:
        test = sorted((p for p in prompts if p["set"] == "test"), key=lambda p: p["utt"])
        eer = stats_cosine_eer([p["wav"] for p in test], [p["spk"] for p in test])
        print(f"floor (cosine on MFCC mean/std, all {len(test) * (len(test) - 1) // 2} test pairs): EER {eer:.4f}")
    return 0


if __name__ == "__main__":
    cli(main)
