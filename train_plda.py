"""Train a two-covariance PLDA back-end (plda.py) on embeddings written by embed.py.

Reads embeddings.h5 (speakers from each dataset's `spk` attribute, or from --utt2spk) or a Kaldi
embeddings.scp (speakers from --utt2spk); --embeddings may also name the folder embed.py wrote into.
With --utt2spk, only the utterances it lists are used. The model is written as JSON, atomically, with the
model that made the embeddings (their provenance), which eval.py --plda checks against its checkpoint.
"""

import e2e_verification.threads  # noqa: F401  (first, before torch: see e2e_verification/threads.py)

# isort: split

import numpy as np

from e2e_verification import embedding_files
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {args.iterations}")
    source, inputs = embedding_files.input_files(args.embeddings)
    inputs["--utt2spk"] = args.utt2spk
    check_outputs({"--out": args.out}, inputs)
    embeddings, speakers, provenance = embedding_files.read_labelled(source, args.utt2spk)
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
