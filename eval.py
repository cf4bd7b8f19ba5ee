"""Score verification trials with the learned distance, cosine similarity and their fusion.

Images: every pair of the test set is a trial. Speech: a Kaldi trials file over utterances of a
feats.scp. Prints EER, minDCF (p_target 0.01 and 0.05, C_miss = C_fa = 1) and AUC per scorer,
and writes one trial per line plus a JSON of the metrics beside it.
"""

import argparse
import os

import numpy as np

import data_load
import models
import plots
import speech_data
from scoring import embed_matrices, evaluate_scores, run_image_eval, score_trials, write_score_file
from utils import (
    ArgumentParser,
    UserError,
    add_device_flags,
    cli,
    device_from_args,
    format_metrics_table,
    load_checkpoint,
)

EXAMPLE = """examples:
  python eval.py --data-path /data/test/ --model resnet --cp-path cp/checkpoint_10ep.pt --out-path scores.out
  python eval.py --test-data /data/test/feats.scp --trials-path /data/test/trials \\
      --cp-path cp/checkpoint_10ep.pt --model TDNN --out-path /results/scores.out"""


def build_parser():
    p = ArgumentParser(description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--model", default=None, help="encoder name; checked against the checkpoint when given")
    p.add_argument("--data-path", default=None, help="test images (default when no --test-data: held-out digits)")
    p.add_argument("--test-data", default=None, help="speech: feats.scp (or a folder holding one) or an HDF5 file")
    p.add_argument("--trials-path", default=None, help="speech: trials file, lines 'enroll test target|nontarget'")
    p.add_argument("--spk2utt", default=None, help="speech without trials: score all pairs of these utterances")
    p.add_argument(
        "--out-path", default=None, help="score file (a folder means <folder>/scores.out); metrics go to <file>.json"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default 64)")
    p.add_argument(
        "--min-frames", type=int, default=100, help="speech: shorter utterances are tiled to this length (default 100)"
    )
    add_device_flags(p)
    p.add_argument("--plot", action="store_true", help="also write DET curves and score histograms (PNG)")
    return p


def load_model(cp_path, model_name, device):
    """The Verifier stored in a checkpoint (weights-only load), in eval mode on `device`."""
    state = load_checkpoint(cp_path)
    config = state["model_config"]
    if model_name is not None and model_name != config["model"]:
        raise UserError(f"--model {model_name} does not match the checkpoint, which holds a {config['model']} model")
    model = models.build_model(config)
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def resolve_out_path(out_path):
    if out_path is None:
        return None
    if out_path.endswith(os.sep) or os.path.isdir(out_path):
        if not os.path.isdir(out_path):
            raise UserError(f"output folder does not exist: {out_path}")
        return os.path.join(out_path, "scores.out")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    return out_path


def checked_features(path, wanted, ncoef):
    """(utt, (ncoef, frames)) matrices of `path`, refusing NaN / Inf and a coefficient count the model does not take."""
    for utt, mat in speech_data.iter_features(path, wanted):
        if ncoef is not None and mat.shape[1] != ncoef:
            raise UserError(
                f"utterance {utt} of {path} has {mat.shape[1]} coefficients per frame; the model takes {ncoef}"
            )
        if not np.isfinite(mat).all():
            raise UserError(f"utterance {utt} of {path} holds NaN or Inf values")
        yield utt, mat.T


def eval_speech(args, model, device, out_path):
    """Embed every utterance named by the trials once (whole, tiled to --min-frames) and score the trials."""
    if models.encoder_domain(model.config["model"]) != "speech":
        raise UserError(f"--test-data needs a speech model; this checkpoint holds {model.config['model']}")
    if args.min_frames < 1:
        raise UserError(f"--min-frames must be >= 1, got {args.min_frames}")
    if args.trials_path:
        enroll, test, target = speech_data.read_trials(args.trials_path)
    elif args.spk2utt:
        enroll, test, target = speech_data.all_pairs_trials(args.spk2utt)
    else:
        raise UserError("speech evaluation needs --trials-path (or --spk2utt to score all pairs)")
    if target.all() or not target.any():
        raise UserError("the trials need at least one target and one non-target pair to compute metrics")
    wanted = list(dict.fromkeys([*enroll, *test]))
    items = checked_features(args.test_data, wanted, model.config["encoder_args"].get("ncoef"))
    ids, emb = embed_matrices(model, items, device, args.min_frames, args.amp, progress=True, total=len(wanted))
    index = {utt: i for i, utt in enumerate(ids)}
    idx_a = np.fromiter((index[u] for u in enroll), dtype=np.int64, count=len(enroll))
    idx_b = np.fromiter((index[u] for u in test), dtype=np.int64, count=len(test))
    scores = score_trials(model.distance, emb, idx_a, idx_b, amp=args.amp)
    metrics = evaluate_scores(scores, target)
    summary = {"trials": len(target), "targets": int(target.sum()), "utterances": len(ids), "metrics": metrics}
    if out_path:
        write_score_file(out_path, enroll, test, scores, target, metrics=summary)
    if out_path and args.plot:
        plots.write_plots(out_path, scores, target, metrics)
    print(f"{len(target)} trials ({summary['targets']} target) over {len(ids)} utterances")
    print(format_metrics_table(metrics))
    if out_path:
        print(f"scores: {out_path}  metrics: {out_path}.json")
    if out_path and args.plot:
        print(f"plots: {out_path}.<scorer>_det.png and {out_path}.<scorer>_hist.png")
    return scores, target, metrics


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = device_from_args(args)
    out_path = resolve_out_path(args.out_path)
    if args.plot and out_path is None:
        raise UserError("--plot writes its PNGs beside the score file: give --out-path too")
    model = load_model(args.cp_path, args.model, device)
    if args.test_data is not None:
        scores, target, _ = eval_speech(args, model, device, out_path)
    else:
        if models.encoder_domain(model.config["model"]) != "image":
            raise UserError("this checkpoint holds a speech model: give --test-data and --trials-path")
        dataset = data_load.load_images(args.data_path, "test")
        if args.batch_size <= 0:
            raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
        run_image_eval(model, dataset, device, args.batch_size, out_path, args.amp, verbose=True, plot=args.plot)
    return 0


if __name__ == "__main__":
    cli(main)
