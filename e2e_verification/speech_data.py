"""Speech data: Kaldi data-dir files, Kaldi features, wav feature sources and the training HDF5.

Feature matrices follow Kaldi's axis order, (frames, ncoef), everywhere in this module except inside
the HDF5 file, which stores each utterance transposed as (ncoef, frames) so a loader can crop along
the last axis; the loader adds the channel axis of the seed's [1, ncoef, T] layout itself.
"""

import contextlib
import dataclasses
import os
import struct
from collections import Counter
from typing import NamedTuple

import h5py
import kaldiio
import numpy as np
from tqdm import tqdm

import data_load
from e2e_verification import frontend
from e2e_verification.augment import Augmenter, speed_perturb
from e2e_verification.frontend import FrontEnd, read_wav
from utils import UserError, atomic_path, atomic_write

HDF5_FORMAT_VERSION = 1
TARGET_LABELS = {"target": True, "tgt": True, "nontarget": False, "nontgt": False}

# ----------------------------------------------------------------------------- Kaldi text tables


def _table_lines(path, what, maxsplit=-1):
    """Yield (line_number, fields) for the non-blank lines of a Kaldi text table, split on whitespace
    (at most `maxsplit` times, the last field then keeping the rest of the line, ends stripped).

    Read as "utf-8-sig": a byte-order mark that a Windows editor put at the start is dropped, not
    glued to the first id (where it would make "missing utterance" errors name an invisible character).
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                fields = line.split(None, maxsplit)
                if fields:
                    fields[-1] = fields[-1].strip()
                    yield number, fields
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a UTF-8 text file ({err.reason})") from None


def read_utt2spk(path):
    """Read a Kaldi utt2spk file (`utt spk` per line) into {utt: spk}."""
    utt2spk = {}
    for number, fields in _table_lines(path, "utt2spk"):
        if len(fields) != 2:
            raise UserError(f"{path} line {number}: expected `utt spk`, got {len(fields)} fields")
        if fields[0] in utt2spk:
            raise UserError(f"{path} line {number}: utterance {fields[0]} is listed twice")
        utt2spk[fields[0]] = fields[1]
    return utt2spk


def read_spk2utt(path):
    """Read a Kaldi spk2utt file (`spk utt1 utt2 ...` per line) into {spk: [utt, ...]}."""
    spk2utt = {}
    for number, fields in _table_lines(path, "spk2utt"):
        if len(fields) < 2:
            raise UserError(f"{path} line {number}: expected `spk utt1 [utt2 ...]`, got one field")
        if fields[0] in spk2utt:
            raise UserError(f"{path} line {number}: speaker {fields[0]} is listed twice")
        spk2utt[fields[0]] = fields[1:]
    return spk2utt


def read_scp(path, what="scp"):
    """Read a Kaldi scp file into a list of (line_number, key, value).

    As in Kaldi, a line is `key<whitespace>rxfilename`: the key ends at the first whitespace and the
    rxfilename is the rest of the line, ends stripped, so a path may hold spaces (`/data/my exp/feats.ark:12`).
    """
    entries = []
    for number, fields in _table_lines(path, what, maxsplit=1):
        if len(fields) < 2:
            raise UserError(f"{path} line {number}: expected `key value`, got one field")
        entries.append((number, fields[0], fields[1]))
    return entries


def _refuse_pipe(path, number, value):
    """Refuse the rxfilenames Kaldi would not read as a file: `cmd |` (a pipe), `|cmd` and `-` (stdin).

    These are Kaldi's own rules (ClassifyRxfilename), so a plain path with spaces is a file, not a command;
    this toolkit never runs a shell.
    """
    if value.endswith("|") or value.startswith("|") or value == "-":
        raise UserError(
            f"{path} line {number}: entry `{value}` is a command or pipe; no shell is run here, "
            "so write the data to a file first and list that file"
        )


def read_wav_scp(path):
    """Read a Kaldi wav.scp into {utt: wav_path}; commands and pipes are refused, paths must exist."""
    wavs = {}
    base = os.path.dirname(os.path.abspath(path))
    for number, utt, value in read_scp(path, "wav.scp"):
        _refuse_pipe(path, number, value)
        if utt in wavs:
            raise UserError(f"{path} line {number}: utterance {utt} is listed twice")
        wav_path = value if os.path.isabs(value) or os.path.exists(value) else os.path.join(base, value)
        if not os.path.isfile(wav_path):
            raise UserError(f"{path} line {number}: audio file not found: {value}")
        wavs[utt] = wav_path
    return wavs


def read_trials(path):
    """Read a trials file (`enroll test target|nontarget` per line) into (enroll ids, test ids, bool array).

    A trial is the ordered pair (enroll, test), so `a b` and `b a` are two trials. A pair listed twice (it
    would count twice in the error rates), or labelled both target and nontarget, is refused naming both lines.
    """
    enroll, test, target = [], [], []
    for number, fields in _table_lines(path, "trials"):
        if len(fields) != 3:
            raise UserError(f"{path} line {number}: expected `enroll test target|nontarget`")
        label = fields[2].lower()
        if label not in TARGET_LABELS:
            raise UserError(f"{path} line {number}: label must be target or nontarget, got {fields[2]!r}")
        enroll.append(fields[0])
        test.append(fields[1])
        target.append(TARGET_LABELS[label])
    if not target:
        raise UserError(f"trials file {path} is empty")
    if len(set(zip(enroll, test))) != len(enroll):
        _refuse_repeated_trial(path)
    return enroll, test, np.asarray(target, dtype=bool)


def _refuse_repeated_trial(path):
    """The UserError for the first trial that a (checked) trials file lists twice, naming both lines."""
    seen = {}  # (enroll, test) -> (line number, label) of its first listing
    for number, (enroll, test, label) in _table_lines(path, "trials"):
        first, is_target = seen.setdefault((enroll, test), (number, TARGET_LABELS[label.lower()]))
        if first == number:
            continue
        if is_target != TARGET_LABELS[label.lower()]:
            raise UserError(
                f"{path} lines {first} and {number}: the trial {enroll} {test} is labelled both target and "
                "nontarget; keep the right one"
            )
        raise UserError(
            f"{path} lines {first} and {number}: the trial {enroll} {test} is listed twice (each trial must be "
            "listed once, or it counts twice in the error rates)"
        )
    raise AssertionError(f"{path}: no repeated trial found")


def all_pairs_trials(spk2utt_path):
    """Every pair of distinct utterances of a spk2utt file, in file order: (enroll ids, test ids, bool array)."""
    utt2spk = speaker_info(spk2utt_path=spk2utt_path)[1]
    utts = list(utt2spk)
    if len(utts) < 2:
        raise UserError(f"{spk2utt_path} lists fewer than two utterances: no pairs to score")
    first, second = np.triu_indices(len(utts), k=1)
    speakers = np.asarray([utt2spk[utt] for utt in utts])
    return [utts[i] for i in first], [utts[j] for j in second], speakers[first] == speakers[second]


def write_table(path, rows):
    """Write a Kaldi text table atomically, one whitespace-joined row per line."""
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(" ".join(row) + "\n")


def write_speaker_tables(folder, utt2spk):
    """Write `utt2spk` and `spk2utt` (both sorted, as Kaldi expects) for {utt: spk} into `folder`."""
    write_table(os.path.join(folder, "utt2spk"), sorted(utt2spk.items()))
    spk2utt, _ = speaker_info_from_utt2spk(dict(sorted(utt2spk.items())))
    write_table(os.path.join(folder, "spk2utt"), ([spk, *utts] for spk, utts in sorted(spk2utt.items())))


# ----------------------------------------------------------------------------- speaker information


def speaker_info(info_dir=None, spk2utt_path=None, utt2spk_path=None):
    """Load (spk2utt, utt2spk) from explicit files or from `info_dir`; a missing one is derived from the other."""
    if spk2utt_path is None and info_dir is not None and os.path.isfile(os.path.join(info_dir, "spk2utt")):
        spk2utt_path = os.path.join(info_dir, "spk2utt")
    if utt2spk_path is None and info_dir is not None and os.path.isfile(os.path.join(info_dir, "utt2spk")):
        utt2spk_path = os.path.join(info_dir, "utt2spk")
    if spk2utt_path is None and utt2spk_path is None:
        raise UserError(f"no spk2utt or utt2spk found (looked in {info_dir}); give --spk2utt or --utt2spk")
    spk2utt = read_spk2utt(spk2utt_path) if spk2utt_path else None
    utt2spk = read_utt2spk(utt2spk_path) if utt2spk_path else None
    if spk2utt is None:
        return speaker_info_from_utt2spk(utt2spk)
    listed = {}
    for spk, utts in spk2utt.items():
        for utt in utts:
            if listed.setdefault(utt, spk) != spk:
                raise UserError(f"{spk2utt_path}: utterance {utt} is listed under {listed[utt]} and {spk}")
    if utt2spk is None:
        return spk2utt, listed
    for utt in [*listed, *utt2spk]:
        if listed.get(utt) != utt2spk.get(utt):
            raise UserError(
                f"{spk2utt_path} and {utt2spk_path} disagree on utterance {utt}: "
                f"speaker {listed.get(utt)} in spk2utt, {utt2spk.get(utt)} in utt2spk"
            )
    return spk2utt, utt2spk


def speaker_info_from_utt2spk(utt2spk):
    """(spk2utt, utt2spk) built from {utt: spk}, utterances in their utt2spk order."""
    spk2utt = {}
    for utt, spk in utt2spk.items():
        spk2utt.setdefault(spk, []).append(utt)
    return spk2utt, utt2spk


def merge_speaker_info(first, second):
    """Merge two (spk2utt, utt2spk) pairs; a speaker in both keeps the utterances of both."""
    spk2utt = {spk: list(utts) for spk, utts in first[0].items()}
    utt2spk = dict(first[1])
    for utt, spk in second[1].items():
        if utt in utt2spk and utt2spk[utt] != spk:
            raise UserError(f"utterance {utt} belongs to {utt2spk[utt]} in the data, to {spk} in the more-data")
        utt2spk[utt] = spk
    for spk, utts in second[0].items():
        known = set(spk2utt.setdefault(spk, []))
        spk2utt[spk].extend(utt for utt in utts if utt not in known)
    return spk2utt, utt2spk


def kept_speakers(spk2utt, min_recordings):
    """Speakers with at least `min_recordings` utterances listed in spk2utt (all of them when it is <= 0)."""
    return {spk for spk, utts in spk2utt.items() if len(utts) >= min_recordings}


# ----------------------------------------------------------------------------- feature sources


def list_scp_files(path):
    """The feature scp files at `path`: the file itself, or in a folder its feats.scp when there is one, else
    every *.scp (sorted) except wav.scp and vad*.scp, which do not hold feature matrices."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "feats.scp")):
            return [os.path.join(path, "feats.scp")]
        names = [n for n in os.listdir(path) if n.endswith(".scp") and n != "wav.scp" and not n.startswith("vad")]
        if not names:
            raise UserError(f"no feature *.scp files in folder {path}")
        return [os.path.join(path, name) for name in sorted(names)]
    if os.path.isfile(path):
        return [path]
    raise UserError(f"feature path not found: {path} (give a folder of *.scp files or a feats.scp)")


def _check_wanted(available, wanted, path):
    """Raise a UserError naming the utterances of `wanted` that `available` lacks."""
    missing = [utt for utt in wanted if utt not in available]
    if missing:
        raise UserError(f"{len(missing)} utterance(s) are missing from {path}, e.g. {', '.join(missing[:3])}")


def iter_features(path, wanted=None):
    """Yield (utt, float32 (frames, ncoef)) one utterance at a time, in file order, from a feats.scp, a folder of
    feature scp files or a data_prep HDF5 (transposed back); with `wanted`, only those, and all must exist."""
    if os.path.isfile(path) and h5py.is_hdf5(path):
        with h5py.File(path, "r") as h5:
            index = _hdf5_index(h5, path)
            if wanted is not None:
                _check_wanted(index, wanted, path)
            keep = index if wanted is None else set(wanted)
            for utt, spk in index.items():
                if utt in keep:
                    yield utt, _hdf5_matrix(h5[spk][utt], path)
        return
    source = KaldiFeatures(list_scp_files(path))
    try:
        if wanted is not None:
            _check_wanted({utt for utt, _ in source.entries}, wanted, path)
        keep = None if wanted is None else set(wanted)
        for utt, spec in source.entries:
            if keep is None or utt in keep:
                yield utt, source.load(spec)
    finally:
        source.close()


def _hdf5_index(h5, path):
    """{utt: spk} of a speaker HDF5, read by data_load.speaker_utterances (which refuses anything but speaker
    groups of utterance datasets)."""
    return {utt: spk for spk, utt, _ in data_load.speaker_utterances(h5, path)}


def _hdf5_matrix(dataset, path):
    """One utterance of a speaker HDF5 as float32 (frames, ncoef); the seed's (1, ncoef, frames) is read too."""
    mat = np.asarray(dataset[()], dtype=np.float32)
    if mat.ndim == 3 and mat.shape[0] == 1:
        mat = mat[0]
    if mat.ndim != 2:
        raise UserError(f"{path}: `{dataset.name.lstrip('/')}` has shape {mat.shape}, not (ncoef, frames)")
    return mat.T


class KaldiEntry(NamedTuple):
    """One feats.scp line: the utterance, its rxfilename (`ark:offset`) and where it was listed."""

    utt: str
    rxfilename: str
    scp: str
    line: int


def ark_location(rxfilename):
    """(ark path, byte offset or None) of a Kaldi rxfilename `path[:offset][range]`."""
    path = rxfilename.split("[", 1)[0] if rxfilename.endswith("]") else rxfilename
    head, sep, tail = path.rpartition(":")
    return (head, int(tail)) if sep and tail.isdigit() else (path, None)


def _unreadable(spec, err):
    """The one-line reason a KaldiEntry could not be read: an offset past the end of its ark, or what went wrong."""
    ark, offset = ark_location(spec.rxfilename)
    where = f"cannot read Kaldi matrix of utterance {spec.utt} ({spec.scp} line {spec.line})"
    size = os.path.getsize(ark) if os.path.isfile(ark) else None
    if offset is not None and size is not None and offset >= size:
        return f"{where}: offset {offset} is past the end of {ark} ({size} bytes); the ark is truncated or replaced"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else "no Kaldi matrix at that offset"
    return f"{where} from {spec.rxfilename}: {reason}"


class KaldiFeatures:
    """Feature matrices listed in Kaldi scp files, read one utterance at a time as float32 (frames, ncoef).

    `entries` are (utt, KaldiEntry); any failure to read one names the utterance, its scp line and its ark.
    """

    kind = "kaldi-feats"
    front_end = None  # computed elsewhere: unknown

    def __init__(self, scp_paths):
        self.entries = []
        seen = {}
        for scp in scp_paths:
            for number, utt, value in read_scp(scp):
                _refuse_pipe(scp, number, value)
                if utt in seen:
                    raise UserError(f"{scp} line {number}: utterance {utt} is also listed in {seen[utt]}")
                seen[utt] = scp
                self.entries.append((utt, KaldiEntry(utt, value, scp, number)))
        self._handles = {}
        self.sample_rate = None

    def load(self, spec):
        """Read one matrix; an ark file referenced by a relative path is found from the current folder."""
        try:
            mat = kaldiio.load_mat(spec.rxfilename, fd_dict=self._handles)
        except FileNotFoundError as err:
            raise UserError(
                f"ark file not found: {err.filename} (utterance {spec.utt}, {spec.scp} line {spec.line}; "
                "relative paths start from the current folder)"
            ) from None
        # corrupt or truncated ark, or an offset past its end (kaldiio asserts on what it finds there)
        except (ValueError, OSError, EOFError, RuntimeError, AssertionError, struct.error) as err:
            raise UserError(_unreadable(spec, err)) from None
        mat = np.asarray(mat)
        if mat.ndim != 2:
            raise UserError(
                f"utterance {spec.utt} ({spec.rxfilename}) holds a {mat.ndim}-d array; "
                "feature matrices are (frames, ncoef)"
            )
        return mat.astype(np.float32, copy=False)

    def close(self):
        """Close the ark files opened while reading."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class WavFeatures:
    """16-bit PCM wav files turned into features, float32 (frames, n_coef), one file (or copy) at a time.

    `entries` are (utt, (path, speed, augmentation plan or None)) as augment.expand makes them. With
    `sample_rate` None every file must share the first file's rate; with a rate, every file is resampled
    to it. Speed perturbation and noise / reverberation are applied at that rate, before the features.
    `front_end` (without CMN, which write_training_data applies) is known once the rate is.
    """

    def __init__(self, entries, kind="mfcc", n_coef=30, num_mel_bins=None, sample_rate=None):
        self.entries = list(entries.items())
        self.kind = f"wav-{kind}"
        self._settings = (kind, n_coef, num_mel_bins)
        self.sample_rate = None
        self.front_end = None
        self.resample = sample_rate is not None
        self.resampled = 0
        if sample_rate is not None:
            self._set_rate(sample_rate)

    def _set_rate(self, rate):
        """Fix the sample rate, and with it the front end."""
        kind, n_coef, bins = self._settings
        self.sample_rate = int(rate)
        if kind == "mfcc":
            self.front_end = FrontEnd.mfcc(n_coef, rate, num_mel_bins=bins)
        else:
            self.front_end = FrontEnd.fbank(bins, rate)

    def load(self, spec):
        """Features of one entry: read, resample if asked, speed-perturb, add noise or reverb, then compute."""
        path, speed, plan = spec
        samples, rate = read_wav(path)
        if self.sample_rate is None:
            self._set_rate(rate)
        elif rate != self.sample_rate:
            if not self.resample:
                raise UserError(
                    f"{path} is sampled at {rate} Hz, earlier files at {self.sample_rate} Hz; resample with sox "
                    "or give --sample-rate"
                )
            samples = frontend.resample(samples, rate, self.sample_rate)
            self.resampled += 1
        samples = speed_perturb(samples, speed)
        if plan is not None and len(samples):
            samples = Augmenter.apply(samples, self.sample_rate, plan)
        return self.front_end.frames(samples)

    def close(self):
        """Nothing to release."""


def wav_dir_entries(folder):
    """Scan `folder`/<speaker>/**/*.wav into ({utt: path}, {utt: spk}); utt ids are `<spk>-<path-without-.wav>`.

    Sub-folders become part of the id with '-' (VoxCeleb's id10001/1zcIwhmdeo4/00001.wav gives
    id10001-1zcIwhmdeo4-00001, Kaldi's own naming).
    """
    if not os.path.isdir(folder):
        raise UserError(f"--wav-dir folder not found: {folder}")
    wavs, utt2spk = {}, {}
    for spk in sorted(os.listdir(folder)):
        spk_dir = os.path.join(folder, spk)
        if not os.path.isdir(spk_dir):
            continue
        for root, dirs, files in os.walk(spk_dir):
            dirs.sort()
            for name in sorted(files):
                if not name.lower().endswith(".wav"):
                    continue
                rel = os.path.relpath(os.path.join(root, name[:-4]), spk_dir)
                utt = f"{spk}-{rel.replace(os.sep, '-')}"
                if any(ch.isspace() for ch in utt):
                    raise UserError(f"{os.path.join(root, name)}: Kaldi ids cannot hold whitespace; rename it")
                wavs[utt] = os.path.join(root, name)
                utt2spk[utt] = spk
    if not wavs:
        raise UserError(f"no .wav files found under {folder}/<speaker>/")
    return wavs, utt2spk


# ----------------------------------------------------------------------------- audio and MFCC


def compute_mfcc(samples, rate, ncoef=30):
    """Kaldi-compatible MFCC (FrontEnd.mfcc: num_mel_bins = num_ceps = ncoef) of int16-scale samples at `rate`.

    Returns float32 (frames, ncoef) with Kaldi's snip-edges=false count, frames = (samples + shift // 2) // shift
    for a 10 ms shift (80 samples at 8 kHz, 160 at 16 kHz), so 0 frames for fewer than shift / 2 samples.
    """
    return FrontEnd.mfcc(ncoef, rate).frames(samples)


def mean_normalize(feats):
    """Per-utterance cepstral mean normalisation of (frames, ncoef) features.

    data_prep applies it only with --cmn: by default the HDF5 stores features as Kaldi's make_mfcc.sh
    writes them (the seed never normalised), so training data and the feats.scp eval.py reads agree.
    """
    return feats - feats.mean(axis=0, keepdims=True)


# ----------------------------------------------------------------------------- writers


class ArkWriter:
    """Append matrices to an open binary ark and remember `utt path:offset` lines for the final ark path."""

    def __init__(self, handle, final_ark):
        self.handle = handle
        self.final_ark = os.path.abspath(final_ark)
        # scp lines are `utt path:offset`, the path being the rest of the line (spaces are fine, as Kaldi and
        # kaldiio read it); only a line break cannot be written there.
        if "\n" in self.final_ark or "\r" in self.final_ark:
            raise UserError(f"a Kaldi scp cannot list a path holding a line break: {self.final_ark!r}")
        self.scp_lines = []

    def write(self, utt, mat):
        """Write one (frames, ncoef) float32 matrix under key `utt`."""
        start = self.handle.tell()
        kaldiio.save_ark(self.handle, {utt: mat})
        offset = start + len(utt.encode("utf-8")) + 1
        self.scp_lines.append(f"{utt} {self.final_ark}:{offset}\n")


@contextlib.contextmanager
def _kaldi_output(folder):
    """Open `folder`/feats.ark for writing (atomically) and write feats.scp after it on success."""
    os.makedirs(folder, exist_ok=True)
    ark = os.path.join(folder, "feats.ark")
    with atomic_path(ark) as tmp, open(tmp, "wb") as handle:
        writer = ArkWriter(handle, ark)
        yield writer
    with atomic_write(os.path.join(folder, "feats.scp")) as handle:
        handle.writelines(writer.scp_lines)


def _check_matrix(utt, mat, ncoef):
    """Reject non-finite matrices and a feature width that differs from the first one."""
    if ncoef is not None and mat.shape[1] != ncoef:
        raise UserError(f"utterance {utt} has {mat.shape[1]} coefficients per frame, expected {ncoef}")
    if not np.isfinite(mat).all():
        raise UserError(f"utterance {utt} holds NaN or Inf values")


def write_training_data(out_file, sources, utt2spk, speakers, cmn=False, kaldi_dir=None, ncoef=None):
    """Write the training HDF5 (one group per speaker, one (ncoef, frames) float32 dataset per utterance).

    Utterances of `sources` whose speaker (through `utt2spk`) is in `speakers` are read one at a time,
    optionally mean-normalised, and also written to `kaldi_dir`/feats.{ark,scp} (+ utt2spk, spk2utt)
    when given. Returns a Counter of written / skipped utterances. Outputs appear only on success.
    """
    counts = Counter()
    written = {}
    total = sum(len(source.entries) for source in sources)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out_file))
        ark = stack.enter_context(_kaldi_output(kaldi_dir)) if kaldi_dir else None
        h5 = stack.enter_context(h5py.File(tmp, "w"))
        bar = stack.enter_context(tqdm(total=total, desc="utterances", unit="utt", disable=None))
        for source in sources:
            stack.callback(source.close)
            for utt, spec in source.entries:
                bar.update(1)
                spk = utt2spk.get(utt)
                if spk is None or spk not in speakers:
                    counts["skipped: no speaker" if spk is None else "skipped: speaker filtered out"] += 1
                    continue
                mat = source.load(spec)
                if mat.shape[0] == 0:
                    counts["skipped: empty"] += 1
                    continue
                _check_matrix(utt, mat, ncoef)
                ncoef = mat.shape[1]
                if cmn:
                    mat = mean_normalize(mat)
                group = h5.require_group(spk)
                group.create_dataset(utt, data=np.ascontiguousarray(mat.T, dtype=np.float32))
                if ark is not None:
                    ark.write(utt, mat)
                written[utt] = spk
                counts["written"] += 1
        if not written:
            raise UserError("no utterance was written: check that the features and utt2spk share ids")
        front_end = _set_root_attrs(h5, ncoef, sources, cmn)
    if kaldi_dir:
        write_speaker_tables(kaldi_dir, written)
        frontend.write_frontend_json(kaldi_dir, front_end)
    counts["front end recorded"] = front_end is not None
    counts["speakers"] = len(set(written.values()))
    return counts


def _set_root_attrs(h5, ncoef, sources, cmn):
    """Record what a reader needs to trust the file: feature width, layout version, provenance, front end.

    The front end (a JSON string in attrs["frontend"]) is recorded only when every source computed its
    features here from audio with one front end; features read from Kaldi have none. Returns it or None.
    """
    h5.attrs["ncoef"] = int(ncoef)
    h5.attrs["format_version"] = HDF5_FORMAT_VERSION
    h5.attrs["layout"] = "group per speaker; dataset per utterance, float32 (ncoef, frames)"
    h5.attrs["source"] = ",".join(sorted({source.kind for source in sources}))
    h5.attrs["cmn"] = bool(cmn)
    rates = {source.sample_rate for source in sources if source.sample_rate}
    if len(rates) == 1:
        h5.attrs["sample_rate"] = rates.pop()
    front_ends = {source.front_end for source in sources}
    if len(front_ends) != 1 or None in front_ends:
        return None
    front_end = dataclasses.replace(front_ends.pop(), cmn=bool(cmn))
    h5.attrs[frontend.HDF5_ATTR] = front_end.to_json()
    return front_end


def checked_features(path, wanted, ncoef):
    """(utt, (ncoef, frames)) matrices of `path`, refusing empty matrices (0 frames), NaN / Inf and a
    coefficient count the model does not take."""
    for utt, mat in iter_features(path, wanted):
        if mat.shape[0] == 0:
            raise UserError(f"utterance {utt} of {path} has no frames (an empty feature matrix); leave it out")
        if ncoef is not None and mat.shape[1] != ncoef:
            raise UserError(
                f"utterance {utt} of {path} has {mat.shape[1]} coefficients per frame; the model takes {ncoef}"
            )
        if not np.isfinite(mat).all():
            raise UserError(f"utterance {utt} of {path} holds NaN or Inf values")
        yield utt, mat.T
