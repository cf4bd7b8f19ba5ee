"""Speech features (Kaldi scp/ark, a Kaldi wav.scp or a folder of wav files) -> the training HDF5.

The HDF5 holds one group per speaker and one float32 dataset per utterance shaped (ncoef, frames);
see speech_data.py for the layout and the MFCC settings of the Kaldi-free front end.
"""

import argparse
import os

import speech_data
from utils import ArgumentParser, UserError, cli

EPILOG = """example (the seed's command line, Kaldi features):
  python data_prep.py --path-to-data data/train/ --data-info-path data/train/ \\
      --path-to-more-data data/vox2/ --more-data-info-path data/vox2/ \\
      --out-path data/ --out-name train.hdf --min-recordings 5

example (no Kaldi: MFCC from a wav.scp, features also exported for eval.py):
  python data_prep.py --wav-scp data/test/wav.scp --out-path data/ --out-name test.hdf \\
      --write-kaldi-feats data/test_feats/"""


def build_parser():
    """The data_prep command line: the seed's flags plus the wav front end."""
    parser = ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kaldi = parser.add_argument_group("Kaldi features (the seed's flags)")
    kaldi.add_argument(
        "--path-to-data",
        default=None,
        help="feats.scp, or a folder of feature *.scp files (its feats.scp when present; wav.scp and vad*.scp "
        "are left out); default ./data/ when no --wav-scp or --wav-dir is given",
    )
    kaldi.add_argument(
        "--data-info-path",
        default=None,
        help="folder holding spk2utt and/or utt2spk (default: the folder of --path-to-data or --wav-scp)",
    )
    kaldi.add_argument("--spk2utt", default=None, help="spk2utt file (default: <data-info-path>/spk2utt)")
    kaldi.add_argument("--utt2spk", default=None, help="utt2spk file (default: <data-info-path>/utt2spk)")
    kaldi.add_argument(
        "--path-to-more-data",
        default=None,
        help="extra folder of *.scp files or feats.scp merged into the output (default: none)",
    )
    kaldi.add_argument(
        "--more-data-info-path",
        default=None,
        help="folder with spk2utt/utt2spk of the extra data (default: its feature folder)",
    )
    kaldi.add_argument("--more-spk2utt", default=None, help="spk2utt of the extra data")
    kaldi.add_argument("--more-utt2spk", default=None, help="utt2spk of the extra data")
    out = parser.add_argument_group("output")
    out.add_argument("--out-path", default="./", help="output folder, created if missing (default ./)")
    out.add_argument(
        "--out-name", default="train.hdf", help="HDF5 file name; an existing one is replaced (default train.hdf)"
    )
    out.add_argument(
        "--min-recordings",
        type=int,
        default=-1,
        help="keep speakers with at least this many utterances in spk2utt (default -1: all)",
    )
    out.add_argument(
        "--write-kaldi-feats",
        default=None,
        metavar="DIR",
        help="also write DIR/feats.ark, feats.scp, utt2spk and spk2utt of what went into the "
        "HDF5, for eval.py and embed.py (default: off)",
    )
    out.add_argument(
        "--cmn",
        action="store_true",
        help="subtract each utterance's mean (per-utterance CMN); off by default, as in the seed, "
        "so the HDF5 matches the features eval.py reads",
    )
    wav = parser.add_argument_group("Kaldi-free front end (MFCC with kaldi-native-fbank)")
    source = wav.add_mutually_exclusive_group()
    source.add_argument(
        "--wav-scp",
        default=None,
        metavar="FILE",
        help="Kaldi wav.scp of 16-bit PCM mono wav paths; commands and pipes are refused",
    )
    source.add_argument(
        "--wav-dir",
        default=None,
        metavar="DIR",
        help="folder with one sub-folder of .wav files per speaker; utt ids are <spk>-<stem>",
    )
    wav.add_argument(
        "--ncoef",
        type=int,
        default=None,
        help="MFCC coefficients (= mel bins) of the wav front end (default 30); with Kaldi features, "
        "the width every matrix must have (default: that of the first one)",
    )
    return parser


def _folder_of(path):
    """The folder a data path lives in (the path itself when it is a folder)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def primary_data(args):
    """The main feature source and its (spk2utt, utt2spk), from --wav-scp, --wav-dir or --path-to-data."""
    if args.wav_scp or args.wav_dir:
        if args.path_to_data:
            raise UserError("give --path-to-data (Kaldi features) or --wav-scp/--wav-dir (audio), not both")
        ncoef = 30 if args.ncoef is None else args.ncoef
        if args.wav_dir:
            if args.spk2utt or args.utt2spk or args.data_info_path:
                raise UserError("--wav-dir takes speakers from its sub-folder names; drop the spk2utt/utt2spk flags")
            wavs, utt2spk = speech_data.wav_dir_entries(args.wav_dir)
            info = speech_data.speaker_info_from_utt2spk(utt2spk)
        else:
            wavs = speech_data.read_wav_scp(args.wav_scp)
            info_dir = args.data_info_path or _folder_of(args.wav_scp)
            info = speech_data.speaker_info(info_dir, args.spk2utt, args.utt2spk)
        return speech_data.WavMfcc(wavs, ncoef), info
    path = args.path_to_data or "./data/"
    source = speech_data.KaldiFeatures(speech_data.list_scp_files(path))
    info = speech_data.speaker_info(args.data_info_path or _folder_of(path), args.spk2utt, args.utt2spk)
    return source, info


def more_data(args):
    """The extra Kaldi feature source and its speaker tables, or None when --path-to-more-data is absent."""
    if not args.path_to_more_data:
        if args.more_data_info_path or args.more_spk2utt or args.more_utt2spk:
            raise UserError("the --more-* speaker flags need --path-to-more-data")
        return None
    source = speech_data.KaldiFeatures(speech_data.list_scp_files(args.path_to_more_data))
    info_dir = args.more_data_info_path or _folder_of(args.path_to_more_data)
    return source, speech_data.speaker_info(info_dir, args.more_spk2utt, args.more_utt2spk)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.ncoef is not None and args.ncoef < 1:
        raise UserError(f"--ncoef must be positive, got {args.ncoef}")
    source, info = primary_data(args)
    sources = [source]
    extra = more_data(args)
    if extra is not None:
        sources.append(extra[0])
        info = speech_data.merge_speaker_info(info, extra[1])
    spk2utt, utt2spk = info
    speakers = speech_data.kept_speakers(spk2utt, args.min_recordings)
    if not speakers:
        raise UserError(f"no speaker has at least {args.min_recordings} recordings")
    os.makedirs(args.out_path, exist_ok=True)
    out_file = os.path.join(args.out_path, args.out_name)
    ncoef = args.ncoef if source.kind == "kaldi-feats" else None
    counts = speech_data.write_training_data(
        out_file, sources, utt2spk, speakers, cmn=args.cmn, kaldi_dir=args.write_kaldi_feats, ncoef=ncoef
    )
    print(
        f"wrote {out_file}: {counts['written']} utterances of {counts['speakers']} speakers "
        f"({len(spk2utt) - len(speakers)} speakers below --min-recordings)"
    )
    listed = sum(spk in speakers for spk in utt2spk.values())
    counts["listed in utt2spk but without features"] = listed - counts["written"] - counts["skipped: empty"]
    for key in sorted(k for k in counts if k not in ("written", "speakers") and counts[k]):
        print(f"  {key}: {counts[key]}")
    if args.write_kaldi_feats:
        print(f"wrote {os.path.join(args.write_kaldi_feats, 'feats.scp')} (+ feats.ark, utt2spk, spk2utt)")
    return 0


if __name__ == "__main__":
    cli(main)
