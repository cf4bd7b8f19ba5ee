"""Scoring: embeddings, e2e / cosine / fused scores for trial lists and for all pairs, score files."""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import atomic_write, compute_metrics, write_json

SCORERS = ("e2e", "cos", "fus")
CPU_PAIR_ELEMENTS = 2**25  # hidden activations held at once when scoring pairs on the CPU (128 MB in fp32)
GPU_PAIR_ELEMENTS = 2**30


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
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with _autocast(device, amp):
            emb = model.embed(x.to(device, non_blocking=True))
        embs.append(emb.float())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels).to(device)


def _pair_budget(distance, device, chunk_elements):
    hidden = distance.heads[0].first.out_features
    budget = chunk_elements or (GPU_PAIR_ELEMENTS if device.type == "cuda" else CPU_PAIR_ELEMENTS)
    return max(1, budget // (hidden * len(distance.heads)))


@torch.no_grad()
def score_trials(distance, emb, idx_a, idx_b, amp=False, chunk_elements=None):
    """Scores of the trials (emb[idx_a[k]], emb[idx_b[k]]) -> {'e2e', 'cos', 'fus'} float32 tensors (trials,).

    The first discriminator layer is applied once per embedding (split form), so a trial costs one
    addition plus the small rest of the MLP.
    """
    distance.eval()
    device = emb.device
    idx_a = torch.as_tensor(idx_a, device=device)
    idx_b = torch.as_tensor(idx_b, device=device)
    halves = [head.split_first_layer(emb) for head in distance.heads]
    norm = F.normalize(emb, dim=1)
    step = _pair_budget(distance, device, chunk_elements)
    e2e = torch.empty(len(idx_a), device=device)
    for start in range(0, len(idx_a), step):
        a, b = idx_a[start : start + step], idx_b[start : start + step]
        with _autocast(device, amp):
            probs = [
                torch.sigmoid(head.tail(left[a] + right[b]).float())
                for head, (left, right) in zip(distance.heads, halves)
            ]
        e2e[start : start + step] = torch.stack(probs).mean(0)
    cos = (norm[idx_a] * norm[idx_b]).sum(1)
    return {"e2e": e2e, "cos": cos, "fus": fuse(e2e, cos)}


@torch.no_grad()
def score_all_pairs(distance, emb, labels, amp=False, chunk_elements=None, progress=False):
    """Scores of all N(N-1)/2 pairs i < j, row-major (itertools.combinations order).

    emb: (N, emb), labels: (N,) -> ({'e2e', 'cos', 'fus'} float32 tensors (pairs,), target (pairs,) bool).
    Rows are processed in blocks so memory stays bounded for any N.
    """
    distance.eval()
    device, n = emb.device, len(emb)
    halves = [head.split_first_layer(emb) for head in distance.heads]
    norm = F.normalize(emb, dim=1)
    labels = labels.to(device)
    budget = _pair_budget(distance, device, chunk_elements)
    e2e, cos, same = [], [], []
    row = 0
    bar = tqdm(total=n * (n - 1) // 2, desc="scoring pairs", unit="pair", unit_scale=True, disable=not progress)
    while row < n - 1:
        cols = n - row - 1
        rows = max(1, min(n - 1 - row, budget // cols))
        stop = row + rows
        mask = torch.ones(rows, cols, dtype=torch.bool, device=device).triu_()
        with _autocast(device, amp):
            probs = [
                torch.sigmoid(head.tail(left[row:stop, None] + right[None, row + 1 :]).float())
                for head, (left, right) in zip(distance.heads, halves)
            ]
        e2e.append(torch.stack(probs).mean(0)[mask])
        cos.append((norm[row:stop] @ norm[row + 1 :].t())[mask])
        same.append((labels[row:stop, None] == labels[None, row + 1 :])[mask])
        bar.update(int(mask.sum()))
        row = stop
    bar.close()
    e2e, cos = torch.cat(e2e), torch.cat(cos)
    return {"e2e": e2e, "cos": cos, "fus": fuse(e2e, cos)}, torch.cat(same)


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


def run_image_eval(model, dataset, device, batch_size, out_path=None, amp=False, verbose=True):
    """All-pairs evaluation of an image dataset: prints and returns {scorer: metrics}; optional score file."""
    from torch.utils.data import DataLoader

    from utils import format_metrics_table

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    emb, labels = embed_loader(model, loader, device, amp=amp, progress=verbose)
    scores, target = score_all_pairs(model.distance, emb, labels, amp=amp, progress=verbose)
    metrics = evaluate_scores(scores, target)
    n = len(emb)
    summary = {"trials": int(target.numel()), "targets": int(target.sum()), "items": n, "metrics": metrics}
    if out_path:
        enroll, test = np.triu_indices(n, 1)
        write_score_file(out_path, enroll, test, scores, target, metrics=summary)
    if verbose:
        print(f"{n} test items, {summary['trials']} trials ({summary['targets']} target)")
        print(format_metrics_table(metrics))
        if out_path:
            print(f"scores: {out_path}  metrics: {out_path}.json")
    return metrics
