"""Embed speech recordings or images with a trained model, for downstream back-ends such as Kaldi's PLDA.

Speech: reads a Kaldi feats.scp (or a folder of *.scp files, or a speaker HDF5 from data_prep.py), or wav files
(--wav-scp, --wav-dir) whose features are computed through the checkpoint's own front end, and embeds every
utterance whole (tiled to --min-frames when shorter). Images: --data names an image source as eval.py reads it
(one sub-folder of images per class, a CIFAR-10 or a Fashion-MNIST IDX folder, or 'digits'), optionally cut to
--classes and --items-per-class (eval.py's seeded draw); every image is one embedding, the vector eval.py's cos
scorer compares. An image's id is `<class folder>-<file path under it, without extension>` for an image-folder
tree ('/' as '-', whitespace as '_'), else `<class index>-<its position among the class's images, zero-padded>`.
Writes, atomically, into --out-path: embeddings.ark + embeddings.scp (Kaldi float vectors, readable by
ivector-compute-plda and friends) and embeddings.h5 (one float32 dataset per utterance or image, with a `spk`
attribute holding the speaker or class when known, an image file's `path` under --data, and the checkpoint that
made them in the root attribute `provenance`, which eval.py --cohort, train_plda.py and train_distance.py carry
on and check).
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import contextlib
import itertools
import json
import os
import re

import h5py
import numpy as np
import torch
from tqdm import tqdm

import data_load
from e2e_verification import speech_data
from e2e_verification.checkpoints import load_model, model_provenance
from e2e_verification.scoring import embed_loader, embed_matrices
from e2e_verification.tasks import ImageTask, task_for_model
from utils import (
    UserError,
    add_device_flags,
    atomic_path,
    atomic_write,
    check_outputs,
    cli,
    device_from_args,
    flag_value,
    make_parser,
)

EXAMPLE = """examples:
  python embed.py --data data/test/feats.scp --cp-path cp/checkpoint_10ep.pt --out-path exp/embeddings/
  python embed.py --wav-dir data/wavs/ --cp-path cp/checkpoint_10ep.pt --out-path exp/embeddings/
  ivector-compute-plda ark:data/train/spk2utt scp:exp/embeddings/embeddings.scp plda   # Kaldi back-end
  python embed.py --data data/fonts/train/ --cp-path cp/fonts/checkpoint_20ep.pt --out-path exp/font_emb/ \\
      --items-per-class 20   # images: one vector per glyph, spk = its font's folder
  python train_plda.py --embeddings exp/font_emb/ --out exp/font_plda.json"""
CHUNK = 1000  # utterances embedded between writes
MIN_FRAMES = 50  # speech: the default of --min-frames
IMAGE_FLAGS = ("--classes", "--items-per-class", "--split")  # what only an image model takes
SPEECH_FLAGS = ("--wav-scp", "--wav-dir", "--utt2spk", "--min-frames")  # what only a speech model takes


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        "--path-to-data",
        dest="data",
        help="speech: feats.scp, a folder of *.scp, or an HDF5 file; images: one sub-folder per class, "
        "a CIFAR-10 or IDX folder, or 'digits'",
    )
    source.add_argument(
        "--wav-scp", default=None, help="speech: a Kaldi wav.scp of 16-bit PCM wav files (features computed)"
    )
    source.add_argument(
        "--wav-dir", default=None, help="speech: one sub-folder of .wav files per speaker (as data_prep.py)"
    )
    p.add_argument(
        "--utt2spk", default=None, help="speech: embed only the utterances listed here, labelled with its speakers"
    )
    p.add_argument("--classes", default=None, help="images: embed only the items of these classes, e.g. 5-9 or 0,2,7")
    p.add_argument(
        "--items-per-class", type=int, default=None, help="images: at most this many items of each class (seeded)"
    )
    p.add_argument(
        "--split",
        choices=("train", "valid", "test"),
        default=None,
        help="images: the split of a CIFAR-10 or IDX folder or the digits (default test, as eval.py reads)",
    )
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--model", default=None, help="encoder name; checked against the checkpoint when given")
    p.add_argument("--out-path", default="./", help="output folder, created if missing (default ./)")
    p.add_argument(
        "--min-frames", type=int, default=None, help=f"speech: shorter utterances are tiled to this length "
        f"(default {MIN_FRAMES})"
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per batch; speech: most equal-length utterances (default 64)"
    )
    add_device_flags(p)
    return p


def check_flags(args):
    """Refuse flag values out of range, before any work."""
    for flag, value in (("--min-frames", args.min_frames), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.items_per_class is not None and args.items_per_class < 1:
        raise UserError(f"--items-per-class must be >= 1, got {args.items_per_class}")


def refuse_flags(args, flags, needs, model_name):
    """Refuse the first of `flags` given on the command line: it needs a `needs` model ('an image', 'a speech')."""
    for flag in flags:
        if flag_value(args, flag) is not None:
            raise UserError(f"{flag} needs {needs} model; this checkpoint holds {model_name}")


# ----------------------------------------------------------------------------- speech


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


def looks_like_images(path):
    """True for 'digits' or a folder without *.scp files that holds sub-folders, IDX files or CIFAR-10."""
    if path == data_load.DIGITS:
        return True
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if any(name.endswith(".scp") for name in names):
        return False
    markers = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "data_batch_1")
    return any(name.startswith(markers) or os.path.isdir(os.path.join(path, name)) for name in names)


def speech_source(args, model, device):
    """(utterance ids, batches of (ids, (n, emb) embeddings), {utt: h5 attributes}) of the speech inputs."""
    name = model.config["model"]
    refuse_flags(args, IMAGE_FLAGS, "an image", f"{name} (a speech model)")
    if args.data is not None and looks_like_images(args.data):
        raise UserError(
            f"--data {args.data} holds images: embedding them needs an image model; this checkpoint holds {name} (a "
            "speech model)"
        )
    features, utts, utt2spk = features_of(args, model)
    attrs = {utt: {"spk": utt2spk[utt]} for utt in utts if utt in utt2spk} if utt2spk else {}
    min_frames = MIN_FRAMES if args.min_frames is None else args.min_frames
    return utts, speech_batches(model, features, device, min_frames, args.amp, args.batch_size), attrs


def speech_batches(model, features, device, min_frames, amp, batch_size):
    """Yield (ids, (n, emb)) for CHUNK (utt, (ncoef, frames)) matrices of `features` at a time."""
    features = iter(features)
    while True:
        ids, emb = embed_matrices(model, itertools.islice(features, CHUNK), device, min_frames, amp, batch_size)
        if not ids:
            return
        yield ids, emb


# ----------------------------------------------------------------------------- images


def refuse_speech_data(path, name):
    """Refuse --data that is not an image source for the image model `name`: a file, or a folder of *.scp."""
    speech = os.path.isdir(path) and any(n.endswith(".scp") for n in os.listdir(path))
    if os.path.isfile(path) and (h5py.is_hdf5(path) or path.endswith((".scp", ".ark"))):
        speech = True
    if speech:
        raise UserError(
            f"--data {path} holds speech features: embedding them needs a speech model; this checkpoint holds "
            f"{name} (an image model), which takes a folder of images (one sub-folder per class), CIFAR-10 or IDX"
        )
    if os.path.isfile(path):
        raise UserError(
            f"--data {path} is a file; the image model {name} reads a folder of images (one sub-folder per "
            "class), a CIFAR-10 or an IDX folder"
        )


def safe_id(text):
    """`text` as a Kaldi and HDF5 name: '/' (and the OS separator) as '-', whitespace as '_'."""
    return re.sub(r"\s", "_", text.replace(os.sep, "-").replace("/", "-"))


def folder_ids(base, index):
    """(ids, {id: attrs}) of the items `index` of an image-folder tree: `<class>-<file under it, no extension>`."""
    root, classes = base.folder.root, base.folder.classes
    ids, attrs, seen = [], {}, {}
    for k in index:
        path, target = base.folder.samples[k]
        stem = os.path.splitext(os.path.relpath(path, os.path.join(root, classes[target])))[0]
        item = f"{safe_id(classes[target])}-{safe_id(stem)}"
        if item in seen:
            raise UserError(f"{seen[item]} and {path} would both be embedded as {item}: rename one of them")
        seen[item] = path
        ids.append(item)
        attrs[item] = {"spk": classes[target], "path": os.path.relpath(path, root)}
    return ids, attrs


def numbered_ids(labels, index):
    """(ids, {id: attrs}) of the items `index` of in-memory images with class `labels` (N,) of the whole split:
    `<class>-<position among its class's images, zero-padded>`."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    position = np.empty(len(labels), dtype=np.int64)
    position[order] = np.arange(len(labels)) - (np.cumsum(counts) - counts)[labels[order]]
    width = len(str(max(int(counts.max()) - 1, 0)))
    ids = [f"{labels[k]}-{position[k]:0{width}d}" for k in index]
    return ids, {item: {"spk": str(labels[k])} for item, k in zip(ids, index)}


def image_ids(dataset):
    """(ids, {id: h5 attributes}) of the items of `dataset` (data_load.load_images, maybe select_classes), in order:
    ids name items of the whole source, so they do not change with --classes or --items-per-class."""
    base, index = dataset, np.arange(len(dataset))
    if isinstance(dataset, data_load.ClassSubset):
        base, index = dataset.dataset, dataset.indices
    if isinstance(base, data_load.FolderImages):
        return folder_ids(base, index)
    return numbered_ids(base.labels, index)


def image_source(args, model, device):
    """(image ids, batches of (ids, (n, emb) embeddings), {id: h5 attributes}) of the images at --data."""
    name = model.config["model"]
    refuse_flags(args, SPEECH_FLAGS, "a speech", f"{name} (an image model)")
    refuse_speech_data(args.data, name)
    dataset = data_load.load_images(args.data, args.split or "test")
    if args.split is not None and isinstance(dataset, data_load.FolderImages):
        raise UserError(f"--split picks a split of CIFAR-10, IDX or the digits; {args.data} is one split already")
    dataset = ImageTask.scored_images(model, dataset, "--data", args.classes, args.items_per_class)
    ids, attrs = image_ids(dataset)
    return ids, image_batches(model, dataset, ids, device, args.batch_size, args.amp), attrs


@torch.no_grad()
def image_batches(model, dataset, ids, device, batch_size, amp):
    """Yield (ids, (n, emb)) a batch at a time, embedded as eval.py embeds its test images (scoring.embed_loader)."""
    from torch.utils.data import DataLoader

    start = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        emb = embed_loader(model, [batch], device, amp)[0]
        yield ids[start : start + len(emb)], emb
        start += len(emb)


SOURCES = {"speech": speech_source, "image": image_source}  # domain -> what reads and embeds its inputs


# ----------------------------------------------------------------------------- output


def write_embeddings(model, batches, ids, out_dir, attrs=None):
    """Write the embeddings of `batches` ((ids, (n, emb) tensor) pairs, covering `ids` in order) into
    embeddings.{ark,scp,h5} in `out_dir`, each h5 vector with its `attrs[id]` ({name: value}). Returns the paths.

    Batches are consumed as they are written, so any size fits; nothing is left behind on failure.
    """
    bad = [item for item in ids if "/" in item]
    if bad:
        raise UserError(f"utterance ids cannot hold '/' (HDF5 names): {', '.join(bad[:3])}")
    attrs = attrs or {}
    paths = [os.path.join(out_dir, f"embeddings.{ext}") for ext in ("ark", "scp", "h5")]
    with contextlib.ExitStack() as stack:
        ark_tmp, h5_tmp = (stack.enter_context(atomic_path(p)) for p in (paths[0], paths[2]))
        ark = speech_data.ArkWriter(stack.enter_context(open(ark_tmp, "wb")), paths[0])
        h5 = stack.enter_context(h5py.File(h5_tmp, "w"))
        h5.attrs["embedding_size"] = model.encoder.embedding_size
        h5.attrs["model"] = model.config["model"]
        h5.attrs["provenance"] = json.dumps(model_provenance(model), sort_keys=True)
        bar = stack.enter_context(tqdm(total=len(ids), desc="embedding", unit="item", disable=None))
        for batch_ids, emb in batches:
            for item, vec in zip(batch_ids, emb.cpu().numpy()):
                ark.write(item, vec)
                dataset = h5.create_dataset(item, data=vec)
                dataset.attrs.update(attrs.get(item, {}))
            bar.update(len(batch_ids))
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
    check_flags(args)
    check_output(args)
    device = device_from_args(args)
    model = load_model(args.cp_path, args.model, device)
    ids, batches, attrs = SOURCES[task_for_model(model.config["model"]).name](args, model, device)
    with output_folder(args.out_path) as out:
        paths = write_embeddings(model, batches, ids, out, attrs)
    print(f"wrote {len(ids)} embeddings of {model.encoder.embedding_size} dimensions: {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    cli(main)
