"""Embed speech recordings with a trained model, for downstream back-ends such as Kaldi's PLDA.

Reads a Kaldi feats.scp (or a folder of *.scp files, or a speaker HDF5 from data_prep.py), or wav files
(--wav-scp, --wav-dir) whose features are computed through the checkpoint's own front end; embeds every
utterance whole (tiled to --min-frames when shorter) and writes, atomically, into --out-path:
embeddings.ark + embeddings.scp (Kaldi float vectors, readable by ivector-compute-plda and friends)
and embeddings.h5 (one float32 dataset per utterance, with a `spk` attribute when the speaker is known, and
the checkpoint that made them in the root attribute `provenance`, which eval.py --cohort and train_plda.py
carry on and check).
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import contextlib
import itertools
import json
import os

import h5py
from tqdm import tqdm

import data_load
from e2e_verification import speech_data
from e2e_verification.checkpoints import load_model, model_provenance
from e2e_verification.scoring import embed_matrices
from e2e_verification.tasks import task_for_model
from utils import (
    UserError,
    add_device_flags,
    atomic_path,
    atomic_write,
    check_outputs,
    cli,
    device_from_args,
    make_parser,
)

EXAMPLE = """examples:
  python embed.py --data data/test/feats.scp --cp-path cp/checkpoint_10ep.pt --out-path exp/embeddings/
  python embed.py --wav-dir data/wavs/ --cp-path cp/checkpoint_10ep.pt --out-path exp/embeddings/
  ivector-compute-plda ark:data/train/spk2utt scp:exp/embeddings/embeddings.scp plda   # Kaldi back-end"""
CHUNK = 1000  # utterances embedded between writes


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", "--path-to-data", dest="data", help="feats.scp, a folder of *.scp, or an HDF5 file")
    source.add_argument("--wav-scp", default=None, help="a Kaldi wav.scp of 16-bit PCM wav files (features computed)")
    source.add_argument("--wav-dir", default=None, help="one sub-folder of .wav files per speaker (as data_prep.py)")
    p.add_argument("--utt2spk", default=None, help="embed only the utterances listed here, labelled with its speakers")
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--model", default=None, help="encoder name; checked against the checkpoint when given")
    p.add_argument("--out-path", default="./", help="output folder, created if missing (default ./)")
    p.add_argument(
        "--min-frames", type=int, default=50, help="shorter utterances are tiled to this length (default 50)"
    )
    add_device_flags(p)
    return p


def available(path):
    """(utterance ids in file order, {utt: spk} or None); speakers come from HDF5 groups or a utt2spk beside the scp."""
    if os.path.isfile(path) and h5py.is_hdf5(path):
        speakers, utts, _ = data_load.read_speaker_index(path)
        utt2spk = {utt: spk for spk in speakers for utt in utts[spk]}
        return list(utt2spk), utt2spk
    scps = speech_data.list_scp_files(path)
    ids = [utt for scp in scps for _, utt, _ in speech_data.read_scp(scp)]
    beside = os.path.join(os.path.dirname(os.path.abspath(scps[0])), "utt2spk")
    return ids, speech_data.read_utt2spk(beside) if os.path.isfile(beside) else None


def available_wavs(wav_scp=None, wav_dir=None):
    """({utt: wav path}, {utt: spk} or None) of a wav.scp (speakers from a utt2spk beside it) or a wav folder."""
    if wav_dir is not None:
        return speech_data.wav_dir_entries(wav_dir)
    wavs = speech_data.read_wav_scp(wav_scp)
    beside = os.path.join(os.path.dirname(os.path.abspath(wav_scp)), "utt2spk")
    return wavs, speech_data.read_utt2spk(beside) if os.path.isfile(beside) else None


def select_utterances(ids, utt2spk, utt2spk_path, where):
    """(utterance ids to embed, {utt: spk} or None): all of `ids`, or those also listed in --utt2spk."""
    if utt2spk_path is None:
        return list(ids), utt2spk
    utt2spk = speech_data.read_utt2spk(utt2spk_path)
    ids = [utt for utt in ids if utt in utt2spk]
    if not ids:
        raise UserError(f"no utterance of {where} is listed in {utt2spk_path}")
    return ids, utt2spk


def features_of(args, model):
    """(feature matrices (utt, (ncoef, frames)) to embed, utterance ids, {utt: spk} or None) of the inputs.

    Features read from --data must come from the model's front end (when both are known); wav files are
    turned into features through the checkpoint's front end, one at a time, as they are embedded.
    """
    from e2e_verification.frontend import front_end_of, wav_features

    task = task_for_model(model.config["model"])
    if args.data is not None:
        task.check_frontend(model, args.data)
        utts, utt2spk = select_utterances(*available(args.data), args.utt2spk, args.data)
        return speech_data.checked_features(args.data, utts, model.config["encoder_args"].get("ncoef")), utts, utt2spk
    front_end = front_end_of(model.config, args.cp_path)
    wavs, utt2spk = available_wavs(args.wav_scp, args.wav_dir)
    utts, utt2spk = select_utterances(list(wavs), utt2spk, args.utt2spk, args.wav_scp or args.wav_dir)
    return ((utt, wav_features(front_end, wavs[utt])) for utt in utts), utts, utt2spk


def write_embeddings(model, features, utts, out_dir, device, min_frames=50, amp=False, utt2spk=None):
    """Embed the (utt, (ncoef, frames)) matrices `features` (of utterances `utts`) and write
    embeddings.{ark,scp,h5} into `out_dir`. Returns the three paths.

    Utterances are read and embedded CHUNK at a time, so any size fits; nothing is left behind on failure.
    """
    bad = [utt for utt in utts if "/" in utt]
    if bad:
        raise UserError(f"utterance ids cannot hold '/' (HDF5 names): {', '.join(bad[:3])}")
    paths = [os.path.join(out_dir, f"embeddings.{ext}") for ext in ("ark", "scp", "h5")]
    features = iter(features)
    with contextlib.ExitStack() as stack:
        ark_tmp, h5_tmp = (stack.enter_context(atomic_path(p)) for p in (paths[0], paths[2]))
        ark = speech_data.ArkWriter(stack.enter_context(open(ark_tmp, "wb")), paths[0])
        h5 = stack.enter_context(h5py.File(h5_tmp, "w"))
        h5.attrs["embedding_size"] = model.encoder.embedding_size
        h5.attrs["model"] = model.config["model"]
        h5.attrs["provenance"] = json.dumps(model_provenance(model), sort_keys=True)
        bar = stack.enter_context(tqdm(total=len(utts), desc="embedding", unit="utt", disable=None))
        while True:
            chunk = itertools.islice(features, CHUNK)
            ids, emb = embed_matrices(model, chunk, device, min_frames, amp)
            if not ids:
                break
            for utt, vec in zip(ids, emb.cpu().numpy()):
                ark.write(utt, vec)
                dataset = h5.create_dataset(utt, data=vec)
                if utt2spk is not None and utt in utt2spk:
                    dataset.attrs["spk"] = utt2spk[utt]
            bar.update(len(ids))
    with atomic_write(paths[1]) as handle:
        handle.writelines(ark.scp_lines)
    return paths


def check_output(args):
    """Before any work: the three outputs in --out-path are none of the inputs, and the folder (or, when it
    is still to be made, its nearest parent) takes new files."""
    path = args.out_path
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"--out-path {path} is a file, not a folder")
    inputs = {f"--{name.replace('_', '-')}": getattr(args, name) for name in ("data", "wav_scp", "wav_dir", "utt2spk")}
    inputs["--cp-path"] = args.cp_path
    outputs = [("--out-path", os.path.join(path, f"embeddings.{ext}")) for ext in ("ark", "scp", "h5")]
    check_outputs(outputs, inputs, create=True)


@contextlib.contextmanager
def output_folder(path):
    """Create the output folder if missing; if this run created it and then fails, remove it again (it is
    empty then: every output is written under a temporary name and only renamed on success)."""
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.min_frames < 1:
        raise UserError(f"--min-frames must be >= 1, got {args.min_frames}")
    check_output(args)
    device = device_from_args(args)
    model = load_model(args.cp_path, args.model, device)
    task_for_model(model.config["model"]).require_recordings("embed.py", model.config["model"])
    features, utts, utt2spk = features_of(args, model)
    with output_folder(args.out_path) as out:
        paths = write_embeddings(model, features, utts, out, device, args.min_frames, args.amp, utt2spk)
    print(f"wrote {len(utts)} embeddings of {model.encoder.embedding_size} dimensions: {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    cli(main)
