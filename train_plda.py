"""Train a two-covariance PLDA back-end (plda.py) on embeddings written by embed.py.

Reads embeddings.h5 (speakers from each dataset's `spk` attribute, or from --utt2spk) or a Kaldi
embeddings.scp (speakers from --utt2spk); --embeddings may also name the folder embed.py wrote into.
With --utt2spk, only the utterances it lists are used. The model is written as JSON, atomically, with the
model that made the embeddings (their provenance), which eval.py --plda checks against its checkpoint.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import h5py
import numpy as np

from e2e_verification import embedding_files, speech_data
from e2e_verification.plda import PLDA
from utils import UserError, check_outputs, cli, make_parser

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


def read_embeddings(path, utt2spk_path=None):
    """(N, d) float32 embeddings, (N,) speaker labels and the provenance of an embed.py output (module doc)."""
    found = embedding_files.read(path)
    utt2spk = speech_data.read_utt2spk(utt2spk_path) if utt2spk_path else None
    vectors, speakers = labelled(found, utt2spk, embedding_files.resolve(path), utt2spk_path)
    return vectors, speakers, found.provenance


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {args.iterations}")
    source = embedding_files.resolve(args.embeddings)
    inputs = {"--embeddings": args.embeddings, "--embeddings file": source, "--utt2spk": args.utt2spk}
    check_outputs({"--out": args.out}, inputs)
    embeddings, speakers, provenance = read_embeddings(source, args.utt2spk)
    n_speakers = len(np.unique(speakers))
    print(f"{len(embeddings)} embeddings of {embeddings.shape[1]} dimensions from {n_speakers} speakers")
    model = PLDA(args.lda_dim, not args.no_whiten, not args.no_length_norm, args.iterations).fit(embeddings, speakers)
    model.provenance = provenance
    model.save(args.out)
    print(
        f"PLDA of {len(model.mu)} dimensions (LDA {args.lda_dim or 'off'}, length norm {not args.no_length_norm}), "
        f"EM {model.iterations_run} iterations: wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    cli(main)
