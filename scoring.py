"""Scoring: embeddings, e2e / cosine / fused scores for trial lists and for all pairs, score files."""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from metrics import compute_metrics
from utils import atomic_write, write_json

SCORERS = ("e2e", "cos", "fus")
# Hidden activations held at once when scoring pairs: 16 MB blocks in fp32 on the CPU (cache-sized,
# measured fastest on a 2-core machine), 1 GB on a GPU.
CPU_PAIR_ELEMENTS = 2**22
GPU_PAIR_ELEMENTS = 2**28


def fuse(e2e, cos):
    """Fused score of the seed: the mean of the e2e probability and the cosine mapped to [0, 1]."""
    return 0.5 * (e2e + 0.5 * (cos + 1.0))


def _autocast(device, amp):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(amp))


@torch.no_grad()
def embed_loader(model, loader, device, amp=False, progress=False, desc="embedding"):
    """Embed every batch of `loader` ((x, label) batches): -> embeddings (N, emb) float32 on device, labels (N,)."""
    model.eval()
    embs, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        with _autocast(device, amp):
            emb = model.embed(x.to(device, non_blocking=True))
        embs.append(emb.float())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels).to(device)


def pair_chunk(distance, device, chunk_elements=None):
    """Pairs scored at once: `chunk_elements` (default by device) pair activations over all heads."""
    budget = chunk_elements or (GPU_PAIR_ELEMENTS if device.type == "cuda" else CPU_PAIR_ELEMENTS)
    return max(1, budget // distance.pair_width)


def _mean_probability(distance, projected, index_a, index_b, amp):
    """Same-class probability averaged over the heads, for the pairs (index_a, index_b) of projected
    embeddings (tensors for aligned trials, or broadcasting slices for a block of all pairs)."""
    device = distance.heads[0].first.weight.device
    with _autocast(device, amp):
        logits = distance.projected_logits(projected, index_a, index_b)
    return torch.sigmoid(logits.float()).mean(0)


@torch.no_grad()
def score_trials(distance, emb, idx_a, idx_b, amp=False, chunk_elements=None):
    """Scores of the trials (emb[idx_a[k]], emb[idx_b[k]]) -> {'e2e', 'cos', 'fus'} float32 tensors (trials,).

    The learned distance projects every embedding once (its fast form), so a trial costs O(hidden)
    elementwise work plus the small rest of the MLP.
    """
    distance.eval()
    device = emb.device
    idx_a = torch.as_tensor(idx_a, dtype=torch.long, device=device)
    idx_b = torch.as_tensor(idx_b, dtype=torch.long, device=device)
    projected = distance.project(emb)
    norm = F.normalize(emb, dim=1)
    step = pair_chunk(distance, device, chunk_elements)
    e2e, cos = torch.empty(len(idx_a), device=device), torch.empty(len(idx_a), device=device)
    for start in range(0, len(idx_a), step):
        part = slice(start, start + step)
        a, b = idx_a[part], idx_b[part]
        e2e[part] = _mean_probability(distance, projected, a, b, amp)
        cos[part] = (norm[a] * norm[b]).sum(1)
    return {"e2e": e2e, "cos": cos, "fus": fuse(e2e, cos)}


@torch.no_grad()
def score_all_pairs(distance, emb, labels, amp=False, chunk_elements=None, progress=False):
    """Scores of all N(N-1)/2 pairs i < j, row-major (itertools.combinations order).

    emb: (N, emb), labels: (N,) -> ({'e2e', 'cos', 'fus'} float32 tensors (pairs,), target (pairs,) bool).
    Rows are processed in blocks of about `chunk_elements` hidden activations (see pair_chunk), so
    the working memory stays bounded for any N; only the outputs grow with N(N-1)/2.
    """
    distance.eval()
    device, n = emb.device, len(emb)
    projected = distance.project(emb)
    norm = F.normalize(emb, dim=1)
    labels = labels.to(device)
    budget = pair_chunk(distance, device, chunk_elements)
    total = n * (n - 1) // 2
    e2e, cos = torch.empty(total, device=device), torch.empty(total, device=device)
    same = torch.empty(total, dtype=torch.bool, device=device)
    row = done = 0
    bar = tqdm(total=total, desc="scoring pairs", unit="pair", unit_scale=True, disable=None if progress else True)
    while row < n - 1:
        cols = n - row - 1
        rows = max(1, min(cols, budget // cols))
        stop, count = row + rows, rows * cols - rows * (rows - 1) // 2
        mask = torch.ones(rows, cols, dtype=torch.bool, device=device).triu_()
        part = slice(done, done + count)
        block_rows, block_cols = (slice(row, stop), None), (None, slice(row + 1, None))
        e2e[part] = _mean_probability(distance, projected, block_rows, block_cols, amp)[mask]
        cos[part] = (norm[row:stop] @ norm[row + 1 :].t())[mask]
        same[part] = (labels[row:stop, None] == labels[None, row + 1 :])[mask]
        bar.update(count)
        row, done = stop, done + count
    bar.close()
    return {"e2e": e2e, "cos": cos, "fus": fuse(e2e, cos)}, same


def evaluate_scores(scores, target, p_targets=(0.01, 0.05)):
    """{scorer: scores} and target flags -> {scorer: {eer, mindcf_*, auc}}."""
    return {name: compute_metrics(scores[name], target, p_targets) for name in SCORERS}


def write_score_file(path, enroll, test, scores, target, metrics=None, chunk=1_000_000):
    """Write one trial per line, `enroll test e2e cos fus target|nontarget`, atomically.

    `enroll` and `test` are arrays of ids (strings or ints). `metrics`, if given, goes to
    `<path>.json` beside it.
    """
    enroll, test = np.asarray(enroll), np.asarray(test)
    columns = [scores[name].detach().float().cpu().numpy() for name in SCORERS]
    words = np.where(np.asarray(target.detach().cpu() if torch.is_tensor(target) else target), "target", "nontarget")
    with atomic_write(path) as handle:
        for start in range(0, len(enroll), chunk):
            part = slice(start, start + chunk)
            lines = [
                f"{a} {b} {x:.6f} {y:.6f} {z:.6f} {w}\n"
                for a, b, x, y, z, w in zip(enroll[part], test[part], *(c[part] for c in columns), words[part])
            ]
            handle.writelines(lines)
    if metrics is not None:
        write_json(path + ".json", metrics)


def report_trials(scores, target, enroll, test, out_path=None, extra=None, plot=False, verbose=True, line=None):
    """Metrics of scored trials, printed as a table; with `out_path` the score file, its JSON summary and
    (with `plot`) DET curves and histograms beside it. Returns {scorer: metrics}.

    `extra` adds counts to the summary (e.g. {'items': N}); `line` is the first printed line, a format
    string over the summary's counts (trials, targets and those of `extra`).
    """
    from metrics import format_metrics_table

    metrics = evaluate_scores(scores, target)
    target_count = int(target.sum())
    summary = {"trials": len(target), "targets": target_count, **(extra or {}), "metrics": metrics}
    if out_path:
        write_score_file(out_path, enroll, test, scores, target, metrics=summary)
    if out_path and plot:
        import plots

        plots.write_plots(out_path, scores, target, metrics)
    if verbose:
        print((line or "{trials} trials ({targets} target)").format(**summary))
        print(format_metrics_table(metrics))
        if out_path:
            print(f"scores: {out_path}  metrics: {out_path}.json")
        if out_path and plot:
            print(f"plots: {out_path}.<scorer>_det.png and {out_path}.<scorer>_hist.png")
    return metrics


def run_image_eval(model, dataset, device, batch_size, out_path=None, amp=False, verbose=True, plot=False):
    """All-pairs evaluation of an image dataset: prints and returns {scorer: metrics}; optional score file
    (and, with `plot`, DET curves and score histograms beside it)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    emb, labels = embed_loader(model, loader, device, amp=amp, progress=verbose)
    scores, target = score_all_pairs(model.distance, emb, labels, amp=amp, progress=verbose)
    enroll, test = np.triu_indices(len(emb), 1)
    line = "{items} test items, {trials} trials ({targets} target)"
    return report_trials(scores, target, enroll, test, out_path, {"items": len(emb)}, plot, verbose, line)


def _tile_to(x, min_frames):
    """Repeat (ncoef, frames) along time to at least `min_frames` frames, as the seed's evaluation did."""
    frames = x.shape[-1]
    if frames >= min_frames:
        return x
    return x.repeat(1, -(-min_frames // frames))[:, :min_frames]


@torch.no_grad()
def embed_matrices(model, items, device, min_frames=100, amp=False, max_batch=64, progress=False, total=None):
    """Embed whole variable-length feature matrices: (key, (ncoef, frames)) pairs -> (keys, (N, emb) float32).

    Each matrix is used at full length, tiled along time to at least `min_frames` when shorter;
    consecutive matrices of equal length share a batch (up to `max_batch`), so nothing is padded
    and every embedding equals (up to rounding) the one of that matrix alone. `items` is consumed
    one matrix at a time, so it can stream from disk; embeddings are returned on `device`.
    """
    model.eval()
    keys, out, pending = [], [], []

    def flush():
        with _autocast(device, amp):
            out.append(model.embed(torch.stack(pending).to(device, non_blocking=True)).float())
        pending.clear()

    for key, mat in tqdm(
        items, desc="embedding", unit="utt", total=total, disable=None if progress else True, leave=False
    ):
        x = mat.float() if torch.is_tensor(mat) else torch.from_numpy(np.array(mat, dtype=np.float32))
        x = _tile_to(x, min_frames)
        if pending and (x.shape != pending[0].shape or len(pending) == max_batch):
            flush()
        keys.append(key)
        pending.append(x)
    if pending:
        flush()
    if not out:
        return keys, torch.empty(0, model.encoder.embedding_size, device=device)
    return keys, torch.cat(out)
