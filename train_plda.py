"""Train a two-covariance PLDA back-end (plda.py) on embeddings written by embed.py.

Reads embeddings.h5 (speakers from each dataset's `spk` attribute, or from --utt2spk) or a Kaldi
embeddings.scp (speakers from --utt2spk); --embeddings may also name the folder embed.py wrote into.
With --utt2spk, only the utterances it lists are used. The model is written as JSON, atomically.
"""

import os

import h5py
import kaldiio
import numpy as np

import speech_data
from plda import PLDA
from utils import UserError, cli, make_parser

EXAMPLE = """example:
  python embed.py --data data/train/feats.scp --utt2spk data/train/utt2spk --cp-path cp/checkpoint_10ep.pt \\
      --out-path exp/train_embeddings/
  python train_plda.py --embeddings exp/train_embeddings/ --out exp/plda.json --lda-dim 200"""


def build_parser():
    p = make_parser(__doc__, EXAMPLE)
    p.add_argument("--embeddings", required=True, help="embeddings.h5 or embeddings.scp, or the folder holding them")
    p.add_argument("--out", required=True, help="output model file (JSON)")
    p.add_argument("--utt2spk", default=None, help="Kaldi utt2spk: speaker labels; only these utterances are used")
    p.add_argument("--lda-dim", type=int, default=None, help="LDA output size (default: no LDA)")
    p.add_argument("--no-whiten", action="store_true", help="without LDA, do not whiten with the total covariance")
    p.add_argument("--no-length-norm", action="store_true", help="skip length normalisation to norm sqrt(dim)")
    p.add_argument("--iterations", type=int, default=100, help="most EM iterations (default 100; stops on convergence)")
    return p


def resolve_embeddings(path):
    """--embeddings -> the file to read: the path itself, or embeddings.h5 (else embeddings.scp) in a folder."""
    if os.path.isdir(path):
        for name in ("embeddings.h5", "embeddings.scp"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"no embeddings.h5 or embeddings.scp in {path}")
    if not os.path.isfile(path):
        raise UserError(f"embeddings not found: {path}")
    return path


def read_hdf5(path, utt2spk):
    """embeddings.h5 -> (utterance ids, (N, d) float32, speakers); speakers from utt2spk or `spk` attributes."""
    ids, vectors, speakers, unlabelled = [], [], [], 0
    with h5py.File(path, "r") as h5:
        for utt, dataset in h5.items():
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
                raise UserError(f"{path}: {utt} is not an embedding vector (expected embed.py's layout)")
            spk = utt2spk.get(utt) if utt2spk is not None else dataset.attrs.get("spk")
            if spk is None:
                unlabelled += utt2spk is None
                continue
            ids.append(utt)
            vectors.append(dataset[()])
            speakers.append(spk.decode() if isinstance(spk, bytes) else str(spk))
    if unlabelled:
        raise UserError(
            f"{unlabelled} embeddings of {path} have no `spk` attribute: give their speakers with --utt2spk"
        )
    return ids, vectors, speakers


def read_scp(path, utt2spk):
    """Kaldi embeddings.scp + utt2spk -> (utterance ids, vectors, speakers) of the utterances utt2spk lists."""
    if utt2spk is None:
        raise UserError(f"{path} holds no speaker labels: give --utt2spk")
    try:
        table = kaldiio.load_scp(path)
        ids = [utt for utt in table if utt in utt2spk]
        vectors = [np.asarray(table[utt], dtype=np.float32) for utt in ids]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read {path} as a Kaldi scp of vectors: {err}") from None
    if any(vec.ndim != 1 for vec in vectors):
        raise UserError(f"{path} holds matrices, not embedding vectors")
    return ids, vectors, [utt2spk[utt] for utt in ids]


def read_embeddings(path, utt2spk_path=None):
    """(N, d) float32 embeddings and (N,) speaker labels from an embed.py output (see the module doc)."""
    path = resolve_embeddings(path)
    utt2spk = speech_data.read_utt2spk(utt2spk_path) if utt2spk_path else None
    if h5py.is_hdf5(path):
        ids, vectors, speakers = read_hdf5(path, utt2spk)
    else:
        ids, vectors, speakers = read_scp(path, utt2spk)
    if not ids:
        raise UserError(f"no labelled embeddings in {path}" + (f" are listed in {utt2spk_path}" if utt2spk else ""))
    if len({len(vec) for vec in vectors}) > 1:
        raise UserError(f"the embeddings in {path} do not all have the same size")
    return np.stack(vectors), np.array(speakers)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {args.iterations}")
    embeddings, speakers = read_embeddings(args.embeddings, args.utt2spk)
    n_speakers = len(np.unique(speakers))
    print(f"{len(embeddings)} embeddings of {embeddings.shape[1]} dimensions from {n_speakers} speakers")
    model = PLDA(args.lda_dim, not args.no_whiten, not args.no_length_norm, args.iterations).fit(embeddings, speakers)
    model.save(args.out)
    print(
        f"PLDA of {len(model.mu)} dimensions (LDA {args.lda_dim or 'off'}, length norm {not args.no_length_norm}), "
        f"EM {model.iterations_run} iterations: wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    cli(main)
