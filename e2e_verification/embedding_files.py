"""The one reader of embedding files: embed.py's embeddings.h5 (one float32 vector per utterance, a `spk`
attribute when the speaker is known, the model that made them in the root attribute `provenance`) and Kaldi
embedding tables (embeddings.scp over an ark of vectors, from embed.py or another toolkit).

train_plda.py reads labelled embeddings through it, eval.py --cohort a cohort; both get the same checks:
a file of another kind, no vectors, vectors of different sizes or non-finite values are one UserError line.
"""

import json
import os
from typing import NamedTuple

import h5py
import kaldiio
import numpy as np

from e2e_verification.speech_data import read_utt2spk
from utils import UserError

NAMES = ("embeddings.h5", "embeddings.scp")  # what embed.py writes into its --out-path folder


class Embeddings(NamedTuple):
    ids: list  # utterance ids, in file order
    vectors: np.ndarray  # (N, d) float32
    speakers: list  # (N,) speaker of each utterance, None where unknown
    provenance: dict | None  # the model that made them (checkpoints.provenance_of), None if not recorded


def resolve(path, flag="--embeddings"):
    """A file path, or embeddings.h5 (else embeddings.scp) in a folder embed.py wrote."""
    if os.path.isdir(path):
        for name in NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"{flag} {path}: no {' or '.join(NAMES)} in this folder")
    if not os.path.isfile(path):
        raise UserError(f"{flag}: embeddings not found: {path}")
    return path


def input_files(path, flag="--embeddings"):
    """(the file `resolve` reads, {name: path} of the path given and that file) for utils.check_outputs, which
    adds the arks a Kaldi scp names: no output may replace any of them."""
    source = resolve(path, flag)
    return source, {flag: path, f"{flag} file": source}


def _provenance(text, where):
    if text is None:
        return None
    try:
        found = json.loads(text)
    except (TypeError, ValueError):
        raise UserError(f"{where}: its provenance record is not JSON") from None
    return found if isinstance(found, dict) else None


def _read_hdf5(path):
    ids, vectors, speakers = [], [], []
    with h5py.File(path, "r") as h5:
        for utt, dataset in h5.items():
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
                raise UserError(f"{path}: {utt} is not an embedding vector (this is not embed.py's embeddings.h5)")
            spk = dataset.attrs.get("spk")
            ids.append(utt)
            vectors.append(np.asarray(dataset[()], dtype=np.float32))
            speakers.append(spk.decode() if isinstance(spk, bytes) else None if spk is None else str(spk))
        provenance = _provenance(h5.attrs.get("provenance"), path)
    return ids, vectors, speakers, provenance


def _looks_like_scp(path):
    """True when the first non-blank lines read `utt rxfilename` (two fields), as a Kaldi scp does."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.split() for line, _ in zip(handle, range(20))]
    except (OSError, UnicodeDecodeError):
        return False
    lines = [fields for fields in lines if fields]
    return bool(lines) and all(len(fields) == 2 for fields in lines)


def _read_scp(path):
    if not _looks_like_scp(path):
        raise UserError(
            f"{path} is neither an embeddings.h5 written by embed.py nor a Kaldi scp of vectors "
            "(lines 'utterance ark-file:offset')"
        )
    try:
        table = kaldiio.load_scp(path)
        ids = list(table)
        vectors = [np.asarray(table[utt], dtype=np.float32) for utt in ids]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read {path} as a Kaldi scp of vectors: {err}") from None
    if any(vec.ndim != 1 for vec in vectors):
        raise UserError(f"{path} holds matrices, not embedding vectors")
    beside = os.path.join(os.path.dirname(path), NAMES[0])  # embed.py writes the h5 beside, with the provenance
    provenance = None
    if os.path.isfile(beside) and h5py.is_hdf5(beside):
        with h5py.File(beside, "r") as h5:
            provenance = _provenance(h5.attrs.get("provenance"), beside)
    return ids, vectors, [None] * len(ids), provenance


def read(path, flag="--embeddings", size=None):
    """Every vector of an embeddings file (or embed.py's folder) -> Embeddings; `size`, when given, is the
    embedding size the caller's model gives. UserError for no vectors, mixed or wrong sizes, NaN or Inf."""
    path = resolve(path, flag)
    ids, vectors, speakers, provenance = _read_hdf5(path) if h5py.is_hdf5(path) else _read_scp(path)
    if not ids:
        raise UserError(f"{flag} {path} holds no embeddings")
    sizes = sorted({len(vec) for vec in vectors})
    if len(sizes) > 1:
        raise UserError(f"{flag} {path}: the embeddings do not all have the same size (found sizes {sizes})")
    if size is not None and sizes[0] != size:
        raise UserError(f"{flag} {path} holds embeddings of size {sizes[0]}; the model's are of size {size}")
    matrix = np.stack(vectors)
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise UserError(f"{flag} {path}: {int(bad.sum())} embeddings hold NaN or Inf (the first: {ids[bad.argmax()]})")
    return Embeddings(ids, matrix, speakers, provenance)


def is_embeddings_file(path):
    """True for an embed.py embeddings.h5 (root attribute embedding_size), not a feature HDF5."""
    if not (os.path.isfile(path) and h5py.is_hdf5(path)):
        return False
    with h5py.File(path, "r") as h5:
        return "embedding_size" in h5.attrs


def labelled(found, utt2spk, path, utt2spk_path):
    """(N, d) vectors and (N,) speakers of the embeddings that have a speaker: from utt2spk (only those it
    lists) or from each vector's `spk` attribute (all must have one)."""
    if utt2spk is not None:
        keep = [k for k, utt in enumerate(found.ids) if utt in utt2spk]
        speakers = [utt2spk[found.ids[k]] for k in keep]
    else:
        missing = sum(spk is None for spk in found.speakers)
        if missing and not h5py.is_hdf5(path):
            raise UserError(f"{path} is a Kaldi table, which holds no speaker labels: give --utt2spk")
        if missing:
            raise UserError(
                f"{missing} embeddings of {path} have no `spk` attribute: give their speakers with --utt2spk"
            )
        keep, speakers = list(range(len(found.ids))), found.speakers
    if not keep:
        raise UserError(f"no labelled embeddings in {path} are listed in {utt2spk_path}")
    return found.vectors[keep], np.array(speakers)


def read_labelled(path, utt2spk_path=None):
    """(N, d) float32 embeddings, (N,) speaker labels and the provenance of an embed.py output: speakers from
    `utt2spk_path` (only the utterances it lists) or from each vector's `spk` attribute (HDF5)."""
    found = read(path)
    utt2spk = read_utt2spk(utt2spk_path) if utt2spk_path else None
    vectors, speakers = labelled(found, utt2spk, resolve(path), utt2spk_path)
    return vectors, speakers, found.provenance
