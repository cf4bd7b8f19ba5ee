"""Speech features (Kaldi scp/ark, a Kaldi wav.scp or a folder of wav files) -> the training HDF5.

The HDF5 holds one group per speaker and one float32 dataset per utterance shaped (ncoef, frames);
see speech_data.py for the layout and frontend.py for the settings of the Kaldi-free front end (MFCC
or log-mel filterbanks), which is recorded in the file. Audio can be speed-perturbed and copied with
added noise or reverberation (augment.py).
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import os

from e2e_verification import augment, speech_data
from utils import UserError, add_options, check_outputs, cli, make_parser

EPILOG = """example (the seed's command line, Kaldi features):
  python data_prep.py --path-to-data data/train/ --data-info-path data/train/ \\
      --path-to-more-data data/vox2/ --more-data-info-path data/vox2/ \\
      --out-path data/ --out-name train.hdf --min-recordings 5

example (no Kaldi: MFCC from a wav.scp, features also exported for eval.py):
  python data_prep.py --wav-scp data/test/wav.scp --out-path data/ --out-name test.hdf \\
      --write-kaldi-feats data/test_feats/

example (80 log-mel filterbanks, speed perturbation, one noisy or reverberant copy per utterance):
  python data_prep.py --wav-scp data/train/wav.scp --out-path data/ --out-name train_aug.hdf \\
      --feature fbank --num-mel-bins 80 --speed-perturb --noise-dir musan/noise \\
      --rir-dir RIRS_NOISES/simulated_rirs --snr-range 0 15 --augment-copies 1 --seed 0"""


# The flags, a table per --help group (see utils.add_options); --wav-scp and --wav-dir exclude each other.
KALDI_OPTIONS = {
    "--path-to-data": dict(
        help="feats.scp, or a folder of feature *.scp files (its feats.scp when present; wav.scp and vad*.scp "
        "are left out); default ./data/ when no --wav-scp or --wav-dir is given"
    ),
    "--data-info-path": dict(
        help="folder holding spk2utt and/or utt2spk (default: the folder of --path-to-data or --wav-scp)"
    ),
    "--spk2utt": dict(help="spk2utt file (default: <data-info-path>/spk2utt)"),
    "--utt2spk": dict(help="utt2spk file (default: <data-info-path>/utt2spk)"),
    "--path-to-more-data": dict(help="extra folder of *.scp files or feats.scp merged into the output (default: none)"),
    "--more-data-info-path": dict(help="folder with spk2utt/utt2spk of the extra data (default: its feature folder)"),
    "--more-spk2utt": dict(help="spk2utt of the extra data"),
    "--more-utt2spk": dict(help="utt2spk of the extra data"),
}

OUTPUT_OPTIONS = {
    "--out-path": dict(default="./", help="output folder, created if missing (default ./)"),
    "--out-name": dict(default="train.hdf", help="HDF5 file name; an existing one is replaced (default train.hdf)"),
    "--min-recordings": (int, -1, "keep speakers with at least this many utterances in spk2utt (default -1: all)"),
    "--write-kaldi-feats": dict(
        default=None,
        metavar="DIR",
        help="also write DIR/feats.ark, feats.scp, utt2spk and spk2utt of what went into the "
        "HDF5, for eval.py and embed.py (default: off)",
    ),
    "--cmn": (
        "subtract each utterance's mean (per-utterance CMN); off by default, as in the seed, "
        "so the HDF5 matches the features eval.py reads",
    ),
}

WAV_SOURCE_OPTIONS = {
    "--wav-scp": dict(
        default=None, metavar="FILE", help="Kaldi wav.scp of 16-bit PCM mono wav paths; commands and pipes are refused"
    ),
    "--wav-dir": dict(
        default=None,
        metavar="DIR",
        help="folder with one sub-folder of .wav files per speaker; utt ids are <spk>-<stem>",
    ),
}

WAV_OPTIONS = {
    "--ncoef": (
        int,
        None,
        "MFCC coefficients of the wav front end (default 30; as many mel bins unless --num-mel-bins); "
        "with Kaldi features, "
        "the width every matrix must have (default: that of the first one)",
    ),
    "--feature": dict(
        choices=("mfcc", "fbank"),
        default=None,
        help="mfcc: Kaldi VoxCeleb MFCC; fbank: Kaldi log mel filterbank energies, same frames and band (default mfcc)",
    ),
    "--num-mel-bins": dict(
        type=int,
        default=None,
        metavar="N",
        help="mel filterbank channels (default: --ncoef for mfcc, 80 for fbank, where it is the feature width)",
    ),
    "--sample-rate": dict(
        type=int,
        default=None,
        metavar="HZ",
        help="resample every file to this rate in Hz (scipy resample_poly); default: the first file's rate, "
        "and a file at another rate is refused",
    ),
}

AUGMENTATION_OPTIONS = {
    "--speed-perturb": (
        "add copies at speeds 0.9 and 1.1 (pitch and tempo, as sox speed) as new speakers "
        "sp0.9-<spk> and sp1.1-<spk>, utterances sp0.9-<utt>, sp1.1-<utt> (default: off)",
    ),
    "--noise-dir": dict(
        default=None,
        metavar="DIR",
        help="wav files of noise (searched recursively, e.g. MUSAN) added to copies at a random SNR (default: none)",
    ),
    "--snr-range": dict(
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="signal-to-noise ratio of the noisy copies in dB, drawn uniformly (default 0 15)",
    ),
    "--rir-dir": dict(
        default=None,
        metavar="DIR",
        help="wav files of room impulse responses (searched recursively, e.g. RIRS_NOISES) to reverberate "
        "copies with (default: none)",
    ),
    "--augment-copies": dict(
        type=int,
        default=None,
        metavar="N",
        help="noisy or reverberant copies per utterance (and per speed copy), each drawing noise or reverb "
        "with equal odds when both folders are given; same speaker, id <utt>-noise<k> / <utt>-reverb<k> (default 1)",
    ),
    "--seed": (int, 0, "seed of the augmentation draws, per utterance and copy (default 0)"),
}


def build_parser():
    """The data_prep command line: the seed's flags plus the wav front end."""
    kaldi, output = ("Kaldi features (the seed's flags)", KALDI_OPTIONS), ("output", OUTPUT_OPTIONS)
    parser = make_parser(__doc__, EPILOG, kaldi, output)
    wav = parser.add_argument_group("Kaldi-free front end (MFCC or filterbanks with kaldi-native-fbank)")
    add_options(wav.add_mutually_exclusive_group(), WAV_SOURCE_OPTIONS)
    add_options(wav, WAV_OPTIONS)
    add_options(parser.add_argument_group("augmentation of the audio (all off by default)"), AUGMENTATION_OPTIONS)
    return parser


def _folder_of(path):
    """The folder a data path lives in (the path itself when it is a folder)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


AUDIO_ONLY = ("feature", "num_mel_bins", "sample_rate", "speed_perturb", "noise_dir", "snr_range", "rir_dir",
              "augment_copies")  # fmt: skip


def check_flags(args):
    """Refuse flag values out of range and audio flags given with Kaldi features."""
    for name in ("ncoef", "num_mel_bins", "sample_rate", "augment_copies"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not (args.wav_scp or args.wav_dir):
        given = [name for name in AUDIO_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} works on audio: give --wav-scp or --wav-dir")
    if not (args.noise_dir or args.rir_dir):
        if args.augment_copies is not None:
            raise UserError("--augment-copies needs --noise-dir or --rir-dir")
    if args.snr_range is not None and not args.noise_dir:
        raise UserError("--snr-range needs --noise-dir")


def feature_width(args):
    """(kind, n_coef, num_mel_bins) of the wav front end from --feature, --ncoef and --num-mel-bins."""
    kind = args.feature or "mfcc"
    if kind == "mfcc":
        ncoef = 30 if args.ncoef is None else args.ncoef
        if args.num_mel_bins is not None and args.num_mel_bins < ncoef:
            raise UserError(f"--num-mel-bins {args.num_mel_bins} is below the {ncoef} MFCC coefficients (--ncoef)")
        return kind, ncoef, args.num_mel_bins
    bins = 80 if args.num_mel_bins is None else args.num_mel_bins
    if args.ncoef is not None and args.ncoef != bins:
        raise UserError(f"with --feature fbank the width is --num-mel-bins ({bins}); drop --ncoef {args.ncoef}")
    return kind, bins, bins


def wav_source(args, wavs, utt2spk):
    """The wav feature source with every copy listed, and {utt: spk} of its entries, copies included."""
    speeds = augment.SPEEDS if args.speed_perturb else ()
    augmenter = None
    if args.noise_dir or args.rir_dir:
        snr = (0.0, 15.0) if args.snr_range is None else args.snr_range
        copies = 1 if args.augment_copies is None else args.augment_copies
        augmenter = augment.Augmenter(args.noise_dir, args.rir_dir, snr, copies, args.seed)
    entries, wav_utt2spk = augment.expand(wavs, utt2spk, speeds, augmenter)
    kind, ncoef, bins = feature_width(args)
    return speech_data.WavFeatures(entries, kind, ncoef, bins, args.sample_rate), wav_utt2spk


def primary_data(args):
    """The main feature source, its (spk2utt, utt2spk) and {utt: spk} of the wav entries and copies ({} for Kaldi)."""
    if args.wav_scp or args.wav_dir:
        if args.path_to_data:
            raise UserError("give --path-to-data (Kaldi features) or --wav-scp/--wav-dir (audio), not both")
        if args.wav_dir:
            if args.spk2utt or args.utt2spk or args.data_info_path:
                raise UserError("--wav-dir takes speakers from its sub-folder names; drop the spk2utt/utt2spk flags")
            wavs, utt2spk = speech_data.wav_dir_entries(args.wav_dir)
            info = speech_data.speaker_info_from_utt2spk(utt2spk)
        else:
            wavs = speech_data.read_wav_scp(args.wav_scp)
            info_dir = args.data_info_path or _folder_of(args.wav_scp)
            info = speech_data.speaker_info(info_dir, args.spk2utt, args.utt2spk)
        source, wav_utt2spk = wav_source(args, wavs, info[1])
        return source, info, wav_utt2spk
    path = args.path_to_data or "./data/"
    source = speech_data.KaldiFeatures(speech_data.list_scp_files(path))
    info = speech_data.speaker_info(args.data_info_path or _folder_of(path), args.spk2utt, args.utt2spk)
    return source, info, {}


def more_data(args):
    """The extra Kaldi feature source and its speaker tables, or None when --path-to-more-data is absent."""
    if not args.path_to_more_data:
        if args.more_data_info_path or args.more_spk2utt or args.more_utt2spk:
            raise UserError("the --more-* speaker flags need --path-to-more-data")
        return None
    source = speech_data.KaldiFeatures(speech_data.list_scp_files(args.path_to_more_data))
    info_dir = args.more_data_info_path or _folder_of(args.path_to_more_data)
    return source, speech_data.speaker_info(info_dir, args.more_spk2utt, args.more_utt2spk)


def _info_files(info_dir, spk2utt, utt2spk):
    """The speaker tables speech_data.speaker_info reads for these flags (explicit files, else those in info_dir)."""
    found = []
    for given, name in ((spk2utt, "spk2utt"), (utt2spk, "utt2spk")):
        if given is None and info_dir is not None and os.path.isfile(os.path.join(info_dir, name)):
            given = os.path.join(info_dir, name)
        if given is not None:
            found.append(given)
    return found


def input_files(args, sources):
    """Every file this run reads: feature scp files and their arks, wav.scp, and the speaker tables."""
    files = []
    for source in sources:
        for _, spec in source.entries if source.kind == "kaldi-feats" else ():
            files += [spec.scp, speech_data.ark_location(spec.rxfilename)[0]]
    if args.wav_scp:
        files.append(args.wav_scp)
    if not args.wav_dir:
        data = args.wav_scp or args.path_to_data or "./data/"
        files += _info_files(args.data_info_path or _folder_of(data), args.spk2utt, args.utt2spk)
    if args.path_to_more_data:
        more_dir = args.more_data_info_path or _folder_of(args.path_to_more_data)
        files += _info_files(more_dir, args.more_spk2utt, args.more_utt2spk)
    return files


def refuse_overwriting_inputs(args, sources, out_file):
    """Refuse, before any work, outputs that are inputs of the same run or cannot be written (utils.check_outputs):
    e.g. --write-kaldi-feats naming the data folder would replace its feats.scp, utt2spk and spk2utt by the subset."""
    inputs = [("read by this run", path) for path in input_files(args, sources)]
    outputs = [("--out-path/--out-name", out_file)]
    if args.write_kaldi_feats:
        names = ("feats.ark", "feats.scp", "utt2spk", "spk2utt", "frontend.json")
        outputs += [("--write-kaldi-feats", os.path.join(args.write_kaldi_feats, name)) for name in names]
    check_outputs(outputs, inputs, create=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    source, info, wav_utt2spk = primary_data(args)
    sources = [source]
    extra = more_data(args)
    if extra is not None:
        sources.append(extra[0])
        info = speech_data.merge_speaker_info(info, extra[1])
    out_file = os.path.join(args.out_path, args.out_name)
    refuse_overwriting_inputs(args, sources, out_file)
    spk2utt, utt2spk = info
    speakers = speech_data.kept_speakers(spk2utt, args.min_recordings)
    if not speakers:
        raise UserError(f"no speaker has at least {args.min_recordings} recordings")
    below = len(spk2utt) - len(speakers)
    if wav_utt2spk:  # --min-recordings counted the original recordings; copies follow their speaker
        if args.speed_perturb:
            speakers |= {f"sp{speed}-{spk}" for speed in augment.SPEEDS for spk in speakers}
        utt2spk = {**utt2spk, **wav_utt2spk}
    os.makedirs(args.out_path, exist_ok=True)
    ncoef = args.ncoef if source.kind == "kaldi-feats" else None
    counts = speech_data.write_training_data(
        out_file, sources, utt2spk, speakers, cmn=args.cmn, kaldi_dir=args.write_kaldi_feats, ncoef=ncoef
    )
    print(
        f"wrote {out_file}: {counts['written']} utterances of {counts['speakers']} speakers "
        f"({below} speakers below --min-recordings)"
    )
    listed = sum(spk in speakers for spk in utt2spk.values())
    counts["listed in utt2spk but without features"] = listed - counts["written"] - counts["skipped: empty"]
    for key in sorted(k for k in counts if k.startswith(("skipped", "listed")) and counts[k]):
        print(f"  {key}: {counts[key]}")
    if getattr(source, "resampled", 0):
        print(f"  resampled to {source.sample_rate} Hz: {source.resampled} utterances")
    if args.write_kaldi_feats:
        recorded = ", frontend.json" if counts["front end recorded"] else ""
        print(f"wrote {os.path.join(args.write_kaldi_feats, 'feats.scp')} (+ feats.ark, utt2spk, spk2utt{recorded})")
    return 0


if __name__ == "__main__":
    cli(main)
