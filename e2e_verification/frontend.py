"""The speech front end as data: wav reading, resampling, Kaldi-compatible MFCC / log-mel filterbanks.

A `FrontEnd` names every setting that changes the features (kind, sample rate, mel bins, cepstra, band,
frame settings, CMN). data_prep.py records it in the HDF5 it writes (`h5.attrs["frontend"]`, a JSON
string) and beside exported Kaldi features (`DIR/frontend.json`), so a model trained on one front end
can refuse features or audio computed with another. Settings it does not name keep Kaldi's defaults:
povey window, pre-emphasis 0.97, DC offset removed, FFT size rounded up to a power of two; MFCC with
C0 replaced by the raw log energy and cepstral lifter 22; filterbanks as log power mel energies.

Audio is 16-bit PCM mono wav at 4 to 384 kHz (read_wav names the cause when a file is not). Samples are
float32 on the int16 scale (what Kaldi feeds its front end); a file at another rate than the front end's
is resampled with `scipy.signal.resample_poly` (a polyphase FIR with a Kaiser window, beta 5, the rate
ratio reduced to lowest terms). A recording to verify or embed must hold at least one analysis window
(25 ms) and not be digital silence (check_recording).
"""

import dataclasses
import json
import math
import os
import struct
from fractions import Fraction

import h5py
import kaldi_native_fbank as knf
import numpy as np
from scipy.signal import resample_poly

from utils import UserError, write_json

KINDS = ("mfcc", "fbank")
HDF5_ATTR = "frontend"
JSON_NAME = "frontend.json"
SOX_HINT = "convert it with sox, e.g. `sox IN -b 16 -e signed-integer -c 1 OUT.wav`"
TRUNCATED_HINT = "copy it again from its source, or keep what is there with `sox IN OUT.wav`"
UNKNOWN_SIZE = 0x7FFFF000  # a data chunk size at least this large that the file does not hold: "until the end"
RATE_RANGE = (4000, 384000)  # Hz: sample rates a wav file (and a front end) may have; others are a damaged header
SILENCE_STEPS = 2  # a recording whose samples span at most this many int16 steps is digital silence (or dither)
WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE = 1, 0xFFFE
WAVE_FORMATS = {2: "Microsoft ADPCM", 3: "IEEE floats", 6: "A-law", 7: "mu-law", 17: "IMA ADPCM", 85: "MP3"}


@dataclasses.dataclass(frozen=True)
class FrontEnd:
    """Every setting of the wav -> features computation; the defaults are Kaldi VoxCeleb's conf/mfcc.conf.

    `num_ceps` is the MFCC output width (None for fbank, whose width is `num_mel_bins`); `high_freq` <= 0
    counts down from Nyquist (-400: 7600 Hz at 16 kHz, 3600 Hz at 8 kHz); `snip_edges=False` gives
    round(samples / shift) frames; `dither` is 0 so the same file always gives the same features; `cmn`
    subtracts each utterance's mean over frames.
    """

    kind: str = "mfcc"
    sample_rate: int = 16000
    num_mel_bins: int = 30
    num_ceps: int | None = 30
    low_freq: float = 20.0
    high_freq: float = -400.0
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    snip_edges: bool = False
    dither: float = 0.0
    cmn: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"front end kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.num_mel_bins < 1 or not RATE_RANGE[0] <= self.sample_rate <= RATE_RANGE[1]:
            raise UserError(
                f"front end needs positive mel bins and a sample rate within {RATE_RANGE[0]}..{RATE_RANGE[1]} Hz, "
                f"got {self.describe()}"
            )
        if self.kind == "mfcc" and not (self.num_ceps and 1 <= self.num_ceps <= self.num_mel_bins):
            raise UserError(f"MFCC needs 1 <= num_ceps <= num_mel_bins, got {self.num_ceps} and {self.num_mel_bins}")
        if self.kind == "fbank" and self.num_ceps is not None:
            raise UserError("a filterbank front end has no cepstra: num_ceps must be None")

    @classmethod
    def mfcc(cls, num_ceps=30, sample_rate=16000, num_mel_bins=None, cmn=False):
        """Kaldi VoxCeleb MFCC; num_mel_bins defaults to num_ceps, as in its conf/mfcc.conf."""
        return cls("mfcc", int(sample_rate), int(num_mel_bins or num_ceps), int(num_ceps), cmn=bool(cmn))

    @classmethod
    def fbank(cls, num_mel_bins=80, sample_rate=16000, cmn=False):
        """Kaldi log mel filterbank energies with the MFCC path's frame settings and band."""
        return cls("fbank", int(sample_rate), int(num_mel_bins), None, cmn=bool(cmn))

    @property
    def n_coef(self):
        """Coefficients per frame of the output."""
        return self.num_ceps if self.kind == "mfcc" else self.num_mel_bins

    def to_dict(self):
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, where="front end"):
        """Rebuild from `to_dict()` output; unknown keys are refused, missing ones take today's defaults."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{where}: unknown front-end setting(s) {', '.join(unknown)} (a newer toolkit?)")
        if data.get("kind") == "fbank":
            data = {"num_ceps": None, **data}
        try:
            return cls(**data)
        except TypeError as err:  # a value of the wrong type, e.g. "16k" for the sample rate
            raise UserError(f"{where}: bad front-end setting ({err})") from None

    def to_json(self):
        """One-line JSON, keys sorted (the HDF5 attribute)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self):
        """A short human-readable summary, e.g. `mfcc 30 ceps / 30 mel bins @ 8000 Hz`."""
        width = (
            f"{self.num_ceps} ceps / {self.num_mel_bins} mel bins"
            if self.kind == "mfcc"
            else f"{self.num_mel_bins} mel bins"
        )
        return f"{self.kind} {width} @ {self.sample_rate} Hz" + (", cmn" if self.cmn else "")

    def describe_difference(self, other):
        """One line naming the settings that differ (`self` first), or '' when both are the same."""
        if other is None:
            return f"front end {self.describe()} vs an unknown front end"
        mine, theirs = self.to_dict(), other.to_dict()
        diffs = [f"{key} {mine[key]} vs {theirs[key]}" for key in mine if mine[key] != theirs[key]]
        return "front end differs: " + ", ".join(diffs) if diffs else ""

    def _options(self):
        """The kaldi-native-fbank options of this front end."""
        opts = knf.MfccOptions() if self.kind == "mfcc" else knf.FbankOptions()
        opts.frame_opts.samp_freq = float(self.sample_rate)
        opts.frame_opts.frame_length_ms = self.frame_length_ms
        opts.frame_opts.frame_shift_ms = self.frame_shift_ms
        opts.frame_opts.snip_edges = self.snip_edges
        opts.frame_opts.dither = self.dither
        opts.mel_opts.num_bins = self.num_mel_bins
        opts.mel_opts.low_freq = self.low_freq
        opts.mel_opts.high_freq = self.high_freq
        if self.kind == "mfcc":
            opts.num_ceps = self.num_ceps
        return opts

    def frames(self, samples):
        """Features of int16-scale samples already at `self.sample_rate`: float32 (frames, n_coef), no CMN.

        Kaldi's axis order; 0 frames for fewer than half a frame shift of samples (snip_edges=False).
        """
        try:
            computer = knf.OnlineMfcc(self._options()) if self.kind == "mfcc" else knf.OnlineFbank(self._options())
        except (ValueError, RuntimeError) as err:  # e.g. more mel bins than FFT bins in the band
            raise UserError(f"kaldi-native-fbank refuses the front end {self.describe()}: {err}") from None
        computer.accept_waveform(float(self.sample_rate), np.ascontiguousarray(samples, dtype=np.float32))
        computer.input_finished()
        count = computer.num_frames_ready
        if count == 0:
            return np.zeros((0, self.n_coef), dtype=np.float32)
        return np.stack([computer.get_frame(i) for i in range(count)]).astype(np.float32)

    def compute(self, waveform, sample_rate):
        """Features of a (samples,) waveform, int16 or float on the int16 scale: float32 (n_coef, frames).

        Resampled first when `sample_rate` differs from the front end's; mean-normalised when `cmn`.
        These are the numbers data_prep.py stores in the HDF5 for the same file.
        """
        waveform = np.asarray(waveform)
        if waveform.ndim != 1:
            raise UserError(f"expected a mono (samples,) waveform, got shape {waveform.shape}")
        if np.issubdtype(waveform.dtype, np.floating) and _looks_unit_scaled(waveform):
            raise UserError("the waveform looks scaled to [-1, 1]; give it on the int16 scale (x 32768)")
        samples = resample(waveform.astype(np.float32), sample_rate, self.sample_rate)
        feats = self.frames(samples)
        if self.cmn and len(feats):
            feats = feats - feats.mean(axis=0, keepdims=True)
        return np.ascontiguousarray(feats.T)


# ----------------------------------------------------------------------------- audio


def _looks_unit_scaled(waveform):
    """True for a float signal in [-1, 1] with fractional values (soundfile/librosa's scale, not int16's)."""
    peak = np.abs(waveform).max() if waveform.size else 0.0
    return 0 < peak <= 1.0 and not np.all(waveform == np.round(waveform))


def read_wav(path):
    """Read a mono 16-bit PCM wav; returns (samples float32 on the int16 scale, rate in Hz).

    Its own RIFF reader (WAVE_FORMAT_EXTENSIBLE with PCM inside is read too), so that each way a file can
    be wrong is one UserError naming the cause: empty, not RIFF/WAVE, no fmt or data chunk, not PCM, not
    mono 16-bit, a sample rate outside RATE_RANGE (checked before any resampling), or truncated (fewer
    bytes than its data chunk announces, or an odd count: not whole samples; see _read_data for the
    placeholder size that files written to a pipe carry).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise _not_wav(path, "it is empty (0 bytes)", hint=False)
            channels, bits, rate = _read_fmt(handle, path)
            _check_fmt(path, channels, bits, rate)
            data = _read_data(handle, path, size)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return np.frombuffer(data, dtype="<i2").astype(np.float32), rate


def _not_wav(path, cause, hint=True):
    """The UserError for a file that is not a 16-bit PCM wav, naming why."""
    return UserError(f"{path} is not a 16-bit PCM wav file: {cause}" + (f"; {SOX_HINT}" if hint else ""))


def _next_chunk(handle, path, wanted):
    """Skip RIFF chunks up to the next `wanted` one (b'fmt ' or b'data'); -> its announced size in bytes."""
    while True:
        head = handle.read(8)
        if len(head) < 8:
            raise _not_wav(path, f"it has no {wanted.decode().strip()} chunk")
        chunk, size = head[:4], struct.unpack("<I", head[4:])[0]
        if chunk == wanted:
            return size
        if chunk == b"data":  # samples before their format
            raise _not_wav(path, "its data chunk comes before its fmt chunk")
        handle.seek(size + size % 2, os.SEEK_CUR)  # chunks are padded to an even length


def _read_fmt(handle, path):
    """Check the RIFF/WAVE header and read the fmt chunk -> (channels, bits per sample, rate in Hz)."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise _not_wav(path, f"no RIFF/WAVE header, so it is not a wav file at all (it starts with {head[:8]!r})")
    size = _next_chunk(handle, path, b"fmt ")
    body = handle.read(size)
    if len(body) < 16:
        raise _not_wav(path, f"its fmt chunk is cut short ({len(body)} of at least 16 bytes)")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID starts with the real format tag
    if tag != WAVE_FORMAT_PCM:
        name = WAVE_FORMATS.get(tag, "an unknown encoding")
        raise _not_wav(path, f"its samples are {name} (format tag {tag}), not PCM integers")
    handle.seek(size % 2, os.SEEK_CUR)
    return channels, bits, rate


def _check_fmt(path, channels, bits, rate):
    """Refuse anything but mono 16-bit at a sample rate in RATE_RANGE."""
    if bits != 16 or channels != 1:
        raise UserError(f"{path} has {channels} channel(s) of {bits}-bit samples, not mono 16-bit; {SOX_HINT}")
    low, high = RATE_RANGE
    if not low <= rate <= high:
        raise UserError(
            f"{path} says its sample rate is {rate} Hz, outside the {low}..{high} Hz this toolkit reads (a damaged "
            "header?); it cannot be resampled from that"
        )


def _read_data(handle, path, file_size):
    """The bytes of the data chunk; a file that ends before them, or an odd count, is refused as truncated.

    A size of UNKNOWN_SIZE or more is a streaming writer's placeholder (sox, ffmpeg and arecord writing to a
    pipe cannot go back to fill it in): the samples run to the end of the file.
    """
    size = _next_chunk(handle, path, b"data")
    left = file_size - handle.tell()
    if size >= UNKNOWN_SIZE and size > left:
        size = left
    if size > left or size % 2:
        found = min(size, left)
        why = f"its data chunk announces {size} bytes of samples but {left} follow" if size > left else ""
        why = why or f"its data chunk holds an odd number of bytes ({size}), not whole 16-bit samples"
        raise UserError(f"{path} is truncated: {why} (cut at {found // 2} samples); {TRUNCATED_HINT}")
    return handle.read(size)


def check_recording(samples, rate, path, window_ms):
    """Refuse a recording that holds nothing to embed: no samples, fewer than one `window_ms` analysis window
    of them, or digital silence (max - min <= SILENCE_STEPS int16 steps: zeros, a constant, or +-1 dither)."""
    if not len(samples):
        raise UserError(f"{path} holds no audio samples")
    needed = math.ceil(window_ms * rate / 1000.0)
    if len(samples) < needed:
        raise UserError(
            f"{path} is too short: {len(samples)} samples at {rate} Hz ({1000.0 * len(samples) / rate:.3g} ms) are "
            f"less than one {window_ms:g} ms analysis window ({needed} samples), the shortest recording taken"
        )
    low, high = float(samples.min()), float(samples.max())
    if high - low <= SILENCE_STEPS:
        where = f"is {low:g}" if low == high else f"lies between {low:g} and {high:g}"
        raise UserError(
            f"{path} is digital silence: every one of its {len(samples)} samples {where} (no signal to embed or verify)"
        )


def resample(samples, rate, target_rate):
    """(samples,) float32 at `rate` -> float32 at `target_rate` with scipy's polyphase resampler (as is if equal)."""
    if rate == target_rate:
        return samples
    ratio = Fraction(int(target_rate), int(rate))
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def load_wav(path, sample_rate=None, allow_empty=False):
    """A mono 16-bit wav as float32 (samples,) on the int16 scale, resampled to `sample_rate` when given.

    A file without samples is a UserError naming it, unless `allow_empty`.
    """
    samples, rate = read_wav(path)
    if not len(samples) and not allow_empty:
        raise UserError(f"{path} holds no audio samples")
    return samples if sample_rate is None else resample(samples, rate, sample_rate)


# ----------------------------------------------------------------------------- where a front end is recorded


def _parse(text, where):
    """A FrontEnd from its JSON text, with the file named in any error."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{where}: the recorded front end is not valid JSON ({err})") from None
    return FrontEnd.from_dict(data, where)


def read_frontend(h5_path):
    """The FrontEnd recorded in a data_prep HDF5, or None (features from Kaldi, or an older file)."""
    if not os.path.isfile(h5_path) or not h5py.is_hdf5(h5_path):
        raise UserError(f"not an HDF5 file: {h5_path}")
    with h5py.File(h5_path, "r") as h5:
        text = h5.attrs.get(HDF5_ATTR)
    if text is None:
        return None
    return _parse(text.decode() if isinstance(text, bytes) else str(text), f"{h5_path} attribute {HDF5_ATTR}")


def write_frontend_json(folder, front_end):
    """Write `folder`/frontend.json (atomically) for Kaldi features exported from `front_end`; with None
    (features of unknown origin), remove a frontend.json left there by an earlier run instead."""
    path = os.path.join(folder, JSON_NAME)
    if front_end is None:
        if os.path.isfile(path):
            os.remove(path)
        return
    write_json(path, front_end.to_dict())


def frontend_for_features(path):
    """The FrontEnd of features at `path` (an HDF5, a feats.scp or a folder of them), or None when unrecorded.

    An HDF5 holds it as an attribute; Kaldi features have it as frontend.json in their folder.
    """
    if os.path.isfile(path) and h5py.is_hdf5(path):
        return read_frontend(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    json_path = os.path.join(folder, JSON_NAME)
    if not os.path.isfile(json_path):
        return None
    with open(json_path, encoding="utf-8") as handle:
        return _parse(handle.read(), json_path)


# ----------------------------------------------------------------------------- wav files for a trained model


def front_end_of(config, cp_path):
    """The FrontEnd a speech checkpoint was trained on; a UserError when it was trained on Kaldi features."""
    if config.get("frontend") is None:
        raise UserError(
            f"{cp_path} was trained on features computed outside this toolkit (Kaldi), so its front end is unknown "
            "and it cannot take wav files; compute features with Kaldi and use eval.py / embed.py --data"
        )
    return FrontEnd.from_dict(config["frontend"], f"{cp_path} front end")


def wav_features(front_end, path):
    """A wav file -> float32 (n_coef, frames) through `front_end`, resampled to its rate when the file's differs.

    UserErrors: what read_wav refuses, and what check_recording refuses (no samples, shorter than one analysis
    window, digital silence).
    """
    samples, rate = read_wav(path)
    check_recording(samples, rate, path, front_end.frame_length_ms)
    feats = front_end.compute(samples, rate)
    assert feats.shape[1] > 0, (path, len(samples), rate)
    return feats


def chunks(feats, chunk_frames):
    """(n_coef, frames) -> list of (n_coef, ~chunk_frames) parts: round(frames / chunk_frames) nearly equal ones
    (so no short leftover chunk), or the whole matrix when `chunk_frames` <= 0 or it is not longer."""
    frames = feats.shape[1]
    if chunk_frames <= 0 or frames <= chunk_frames:
        return [feats]
    return np.array_split(feats, max(1, round(frames / chunk_frames)), axis=1)
