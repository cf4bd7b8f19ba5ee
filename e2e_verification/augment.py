"""Data augmentation: SpecAugment on feature batches (training time); speed, noise and reverb on audio (data_prep).

Audio functions take and return float32 (samples,) on the int16 scale, the waveform the front end reads.
Nothing is clipped: the augmented audio goes straight into the features and is never written as a wav.

Data-prep policy (`Augmenter`): every utterance (after speed perturbation, every speed copy) gets
`copies` augmented copies; each copy draws, independently, noise or reverberation (with equal odds when
both folders are given), one file of that folder uniformly, and for noise an SNR uniform in the range.
The draws of a copy come from a generator seeded by (seed, utterance id, copy number), so a copy does
not change when other utterances are added, filtered out or reordered.
"""

import functools
import hashlib
import os
from fractions import Fraction

import numpy as np
import torch
from scipy.signal import fftconvolve, resample_poly
from torch import nn

from e2e_verification.frontend import load_wav
from utils import UserError

SPEEDS = (0.9, 1.1)
NOISE, REVERB = "noise", "reverb"


# ----------------------------------------------------------------------------- SpecAugment


class SpecAugment(nn.Module):
    """Random time and frequency stripes masked out of (batch, ncoef, frames) features, in training only.

    Each example gets `time_masks` stripes of frames and `freq_masks` stripes of coefficients, each of a
    width drawn uniformly from 0..width (inclusive; a stripe may be empty) at a uniform position; stripes
    may overlap. Masked cells become 0 (`fill="zero"`, SpecAugment's choice, meant for mean-normalised
    features: data_prep.py --cmn) or the coefficient's mean over the utterance's frames (`fill="mean"`,
    the same thing for mean-normalised features, and neutral for raw MFCC / log-mel ones). Draws use
    torch's generator of the input's device, so torch.manual_seed makes them repeatable. Any leading
    shape works, e.g. (batch, 1, ncoef, frames); in eval() mode the input is returned as it is.
    """

    def __init__(self, time_masks=2, time_width=10, freq_masks=2, freq_width=8, fill="zero"):
        super().__init__()
        if min(time_masks, time_width, freq_masks, freq_width) < 0:
            raise UserError("SpecAugment mask counts and widths must be >= 0")
        if fill not in ("zero", "mean"):
            raise UserError(f"SpecAugment fill must be zero or mean, got {fill!r}")
        self.time_masks, self.time_width = int(time_masks), int(time_width)
        self.freq_masks, self.freq_width = int(freq_masks), int(freq_width)
        self.fill = fill

    def extra_repr(self):
        return (
            f"time_masks={self.time_masks}, time_width={self.time_width}, "
            f"freq_masks={self.freq_masks}, freq_width={self.freq_width}, fill={self.fill}"
        )

    @staticmethod
    def stripes(n_examples, size, count, width, device):
        """Boolean (n_examples, size): the union of `count` stripes of width U{0..width} per example."""
        mask = torch.zeros(n_examples, size, dtype=torch.bool, device=device)
        positions = torch.arange(size, device=device)
        for _ in range(count):
            widths = torch.randint(0, width + 1, (n_examples, 1), device=device).clamp(max=size)
            starts = (torch.rand(n_examples, 1, device=device) * (size - widths + 1)).long()
            mask |= (positions >= starts) & (positions < starts + widths)
        return mask

    def forward(self, x):
        """x: (..., ncoef, frames) -> the same shape, masked when training."""
        if not self.training or x.numel() == 0:
            return x
        *lead, n_coef, n_frames = x.shape
        flat = x.reshape(-1, n_coef, n_frames)
        time = self.stripes(flat.shape[0], n_frames, self.time_masks, self.time_width, x.device)
        freq = self.stripes(flat.shape[0], n_coef, self.freq_masks, self.freq_width, x.device)
        mask = time[:, None, :] | freq[:, :, None]
        fill = (
            flat.mean(dim=2, keepdim=True) if self.fill == "mean" else torch.zeros((), dtype=x.dtype, device=x.device)
        )
        return torch.where(mask, fill, flat).reshape(x.shape)


# ----------------------------------------------------------------------------- audio transforms


def speed_perturb(samples, factor):
    """Play `samples` `factor` times faster, pitch and tempo together (sox `speed`): (samples,) float32.

    The signal is read as if sampled at rate * factor and resampled back to the rate (scipy's polyphase
    resampler), so the length becomes ceil(len / factor) and every frequency is multiplied by `factor`.
    """
    if factor == 1.0:
        return samples
    ratio = Fraction(factor).limit_denominator(1000)
    return resample_poly(samples, ratio.denominator, ratio.numerator).astype(np.float32)


def noise_segment(noise, length, rng):
    """`length` samples of `noise` from a uniform random start; a shorter noise is tiled (read circularly)."""
    if len(noise) >= length:
        start = int(rng.integers(0, len(noise) - length + 1))
        return noise[start : start + length]
    start = int(rng.integers(0, len(noise)))
    return np.take(noise, (start + np.arange(length)) % len(noise))


def add_noise(speech, noise, snr_db):
    """speech + noise scaled so that 10*log10(mean(speech^2) / mean(scaled_noise^2)) == snr_db.

    Both (samples,) of one length; silent speech comes back unchanged; silent noise is refused.
    """
    assert len(speech) == len(noise), "cut the noise to the speech's length first (noise_segment)"
    speech64, noise64 = speech.astype(np.float64), noise.astype(np.float64)
    p_speech, p_noise = np.mean(speech64**2), np.mean(noise64**2)
    if p_noise == 0:
        raise UserError("the noise segment is silent")
    scale = np.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (speech64 + scale * noise64).astype(np.float32)


def reverberate(speech, rir):
    """Convolve with the RIR scaled to unit energy, shifted to its direct-path peak, cut to the input length.

    out[n] = sum_k h[k] * speech[n + peak - k], h = rir / ||rir||, peak = argmax |rir|: the direct sound
    stays where it was and the reverberant tail follows it. FFT convolution, float64 inside.
    """
    rir64 = rir.astype(np.float64)
    energy = np.sum(rir64**2)
    if energy == 0:
        raise UserError("the room impulse response is silent")
    peak = int(np.argmax(np.abs(rir64)))
    full = fftconvolve(speech.astype(np.float64), rir64 / np.sqrt(energy))
    return full[peak : peak + len(speech)].astype(np.float32)


# ----------------------------------------------------------------------------- data-prep augmentation


def wav_files(folder, flag):
    """Every *.wav under `folder`, searched recursively, sorted; a UserError naming `flag` when there is none."""
    if not os.path.isdir(folder):
        raise UserError(f"{flag} folder not found: {folder}")
    found = sorted(
        os.path.join(root, name)
        for root, _, files in os.walk(folder, followlinks=True)
        for name in files
        if name.lower().endswith(".wav")
    )
    if not found:
        raise UserError(f"no .wav files found under {flag} {folder}")
    return found


def _seed_of(*parts):
    """A stable 64-bit seed from strings and numbers (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=32)
def _load_cached(path, rate):
    """A noise or RIR file at `rate`, kept for reuse (read-only)."""
    samples = load_wav(path, rate)
    samples.setflags(write=False)
    return samples


class Augmenter:
    """Additive noise and reverberation copies for data_prep.py, drawn per copy as the module docstring says."""

    def __init__(self, noise_dir=None, rir_dir=None, snr_range=(0.0, 15.0), copies=1, seed=0):
        if copies < 1:
            raise UserError(f"--augment-copies must be at least 1, got {copies}")
        low, high = snr_range
        if not low <= high:
            raise UserError(f"--snr-range needs LOW <= HIGH, got {low} {high}")
        self.files = {}
        if noise_dir:
            self.files[NOISE] = wav_files(noise_dir, "--noise-dir")
        if rir_dir:
            self.files[REVERB] = wav_files(rir_dir, "--rir-dir")
        assert self.files, "an Augmenter needs a noise or a RIR folder"
        self.snr_range, self.copies, self.seed = (float(low), float(high)), int(copies), int(seed)

    def plans(self, utt):
        """The `copies` draws for utterance `utt`: [(id suffix, plan dict)], e.g. ('-noise1', {...})."""
        kinds = sorted(self.files)
        out = []
        for copy in range(1, self.copies + 1):
            rng = np.random.default_rng(_seed_of(self.seed, utt, copy))
            kind = kinds[int(rng.integers(len(kinds)))]
            files = self.files[kind]
            plan = {"kind": kind, "file": files[int(rng.integers(len(files)))], "seed": int(rng.integers(2**63))}
            if kind == NOISE:
                plan["snr_db"] = float(rng.uniform(*self.snr_range))
            out.append((f"-{kind}{copy}", plan))
        return out

    @staticmethod
    def apply(samples, rate, plan):
        """One planned copy of (samples,) float32 at `rate`: noise at the planned SNR, or reverberation."""
        if plan["kind"] == REVERB:
            rir = _load_cached(plan["file"], rate)
            try:
                return reverberate(samples, rir)
            except UserError as err:
                raise UserError(f"{plan['file']}: {err}") from None
        noise = _load_cached(plan["file"], rate)
        rng = np.random.default_rng(plan["seed"])
        for _ in range(10):  # a segment of digital silence inside a noise file: draw another one
            segment = noise_segment(noise, len(samples), rng)
            if np.any(segment):
                return add_noise(samples, segment, plan["snr_db"])
        raise UserError(f"{plan['file']}: no segment of {len(samples)} samples holds anything but silence")


def expand(wavs, utt2spk, speeds=(), augmenter=None):
    """Every utterance and its copies: ({utt: (path, speed, plan or None)}, {utt: spk}).

    Speed copies are `sp<f>-<utt>` of speaker `sp<f>-<spk>` (Kaldi's naming); augmented copies keep the
    speaker and append `-noise<k>` / `-reverb<k>`, made of each speed version. An utterance without a
    speaker in `utt2spk` keeps its plain entry only (data_prep counts it as skipped).
    """
    entries, speakers = {}, {}
    for utt, path in wavs.items():
        spk = utt2spk.get(utt)
        if spk is None:
            entries[utt] = (path, 1.0, None)
            continue
        for speed in (1.0, *speeds):
            prefix = "" if speed == 1.0 else f"sp{speed}-"
            variants = [(prefix + utt, None)]
            if augmenter is not None:
                variants += [(prefix + utt + suffix, plan) for suffix, plan in augmenter.plans(prefix + utt)]
            for name, plan in variants:
                entries[name] = (path, speed, plan)
                speakers[name] = prefix + spk
    return entries, speakers
