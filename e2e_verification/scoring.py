"""Scoring: the list of scorers, trial lists and all pairs scored in blocks, metrics in bounded memory, score files.

Every consumer (score files, the metrics JSON, the printed tables, plots, the validation history) iterates
a list of `Scorer`s. A scorer turns the shared results of a block of pairs (a `PairBlock`: the learned
distance's mean probability and mean logit over its heads, the cosine, the pairs' items) into its score
column, so a new back-end (calibrated, normalised, PLDA) is one more entry in a list.
"""

import ctypes
import dataclasses
import functools
import json
import zipfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from e2e_verification.metrics import compute_metrics, format_table
from e2e_verification.streaming_metrics import CHUNK, NonFiniteScores, as_float32, table_metrics
from utils import UserError, atomic_path, atomic_write, write_json

# Hidden activations held at once when scoring pairs: 16 MB blocks in fp32 on the CPU (cache-sized,
# measured fastest on a 2-core machine), 1 GB on a GPU.
CPU_PAIR_ELEMENTS = 2**22
GPU_PAIR_ELEMENTS = 2**28
SCORE_FORMATS = ("text", "npy")
BASE = ("prob", "logit", "cos")  # the shared results of a pair every scorer is computed from
WRITE_CHUNK = 1 << 16  # pairs written at once (text lines: their Python objects take ~150 bytes each)
# Pairs per piece of a PairTable's results: 32 MB of float32, past glibc's largest dynamic mmap threshold
# (32 MB), so every piece is its own mapping and freeing it returns the memory to the system at once.
PIECE = 1 << 23
P_TARGETS = (0.01, 0.05)  # priors of the reported minDCF and actDCF (unit costs)
ROC_KEYS = ("eer", *(f"mindcf_{p:g}" for p in P_TARGETS), "auc")
LLR_KEYS = ("cllr", "min_cllr", *(f"act_dcf_{p:g}" for p in P_TARGETS))


def fuse(e2e, cos):
    """Fused score of the seed: the mean of the e2e probability and the cosine mapped to [0, 1]."""
    return 0.5 * (e2e + 0.5 * (cos + 1.0))


@dataclasses.dataclass(frozen=True)
class Scorer:
    """One score column. `column(block)` -> (pairs,) float tensor: the scores of a PairBlock's pairs.

    is_llr: the scores are read as natural-log likelihood ratios (Cllr, minCllr, actDCF are reported);
    validate: its EER is tracked every training epoch (history key `<name>_eer`, TensorBoard tag `tag`);
    fmt: its %-format in text score files; title: the plots' name for it.
    """

    name: str
    column: Callable
    help: str
    is_llr: bool = False
    validate: bool = False
    fmt: str = "%.7g"
    title: str = ""
    tag: str = ""


def seed_scorer(name, column, help, title, tag):
    """One of the research code's three scores: its EER tracked every epoch, written with 6 decimals."""
    return Scorer(name, column, help, validate=True, fmt="%.6f", title=title, tag=tag)


SCORERS = (
    seed_scorer(
        "e2e",
        lambda b: b.prob,
        "the learned distance's probability that the pair shares a class (mean over the heads)",
        "e2e (learned distance)",
        "E2E",
    ),
    seed_scorer("cos", lambda b: b.cos, "cosine similarity of the two embeddings, in [-1, 1]", "cosine", "Cosine"),
    seed_scorer(
        "fus",
        lambda b: fuse(b["e2e"], b["cos"]),
        "0.5 * (e2e + 0.5 * (cos + 1)): the research code's fixed, uncalibrated fusion",
        "fusion (e2e + cosine)",
        "Fus",
    ),
    Scorer(
        "e2e_logit",
        lambda b: b.logit,
        "the learned distance's logit (mean over the heads): its estimate of the log-likelihood ratio",
        is_llr=True,
        title="e2e logit (learned distance)",
    ),
)
VALIDATION_SCORERS = tuple(s for s in SCORERS if s.validate)


class PairBlock:
    """The shared results for a block of pairs, from which every scorer's column is computed.

    prob, logit, cos: (pairs,) float32 tensors (mean sigmoid and mean logit of the learned distance's heads,
    cosine), or callables giving them on first use. `indices()` -> (idx_a, idx_b) (pairs,) int64 tensors,
    the items of each pair, made on first use (per-item statistics such as S-norm's read them).
    `block[name]` is scorer `name`'s column, computed once, so one scorer may read another's (fus reads e2e
    and cos). `reads`: the shared results read so far (which of BASE): how a PairTable learns what each
    scorer needs.
    """

    def __init__(self, scorers, prob, logit, cos, indices):
        self.scorers = {s.name: s for s in scorers}
        self._base = {"prob": prob, "logit": logit, "cos": cos}
        self.reads = set()
        self._make_indices, self._indices = indices, None
        self._columns = {}

    def _read(self, name):
        self.reads.add(name)
        if callable(self._base[name]):  # loaded on first use (a PairTable may have freed what no one reads)
            self._base[name] = self._base[name]()
        return self._base[name]

    prob = property(lambda self: self._read("prob"))
    logit = property(lambda self: self._read("logit"))
    cos = property(lambda self: self._read("cos"))

    def indices(self):
        if self._indices is None:
            self._indices = self._make_indices()
        return self._indices

    def __getitem__(self, name):
        if name not in self._columns:
            self._columns[name] = self.scorers[name].column(self)
        return self._columns[name]

    def __contains__(self, name):
        return name in self.scorers

    def __iter__(self):
        return iter(self.scorers)


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


def _head_means(distance, projected, index_a, index_b, amp):
    """(mean probability, mean logit) over the heads, float32, for the pairs (index_a, index_b) of projected
    embeddings (tensors for aligned trials, or broadcasting slices for a block of all pairs)."""
    device = distance.heads[0].first.weight.device
    with _autocast(device, amp):
        logits = distance.projected_logits(projected, index_a, index_b)
    logits = logits.float()
    return torch.sigmoid(logits).mean(0), logits.mean(0)


@torch.no_grad()
def trial_results(distance, emb, idx_a, idx_b, amp=False, chunk_elements=None):
    """Shared results of the trials (emb[idx_a[k]], emb[idx_b[k]]): (prob, logit, cos), (trials,) float32 each.

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
    prob, logit, cos = (torch.empty(len(idx_a), device=device) for _ in range(3))
    for start in range(0, len(idx_a), step):
        part = slice(start, start + step)
        a, b = idx_a[part], idx_b[part]
        prob[part], logit[part] = _head_means(distance, projected, a, b, amp)
        cos[part] = (norm[a] * norm[b]).sum(1)
    return prob, logit, cos


def score_trials(distance, emb, idx_a, idx_b, amp=False, chunk_elements=None, scorers=None):
    """Scores of the trials (emb[idx_a[k]], emb[idx_b[k]]) -> {scorer name: (trials,) float32 tensor} for
    `scorers` (default SCORERS)."""
    scorers = scorers or SCORERS
    prob, logit, cos = trial_results(distance, emb, idx_a, idx_b, amp, chunk_elements)
    device = emb.device
    indices = (torch.as_tensor(i, dtype=torch.long, device=device) for i in (idx_a, idx_b))
    block = PairBlock(scorers, prob, logit, cos, lambda: tuple(indices))
    return {s.name: block[s.name] for s in scorers}


@torch.no_grad()
def all_pairs_blocks(distance, emb, labels, amp=False, chunk_elements=None, progress=False):
    """The N(N-1)/2 pairs i < j in row-major (itertools.combinations) order, a block of rows at a time.

    emb: (N, emb), labels: (N,). Yields (start, prob, logit, cos, same): the block's first pair position and
    its (pairs,) float32 results and bool same-class flags on emb's device. A block holds about
    `chunk_elements` hidden activations (see pair_chunk), so the working memory is bounded for any N.
    """
    distance.eval()
    device, n = emb.device, len(emb)
    projected = distance.project(emb)
    norm = F.normalize(emb, dim=1)
    labels = labels.to(device)
    budget = pair_chunk(distance, device, chunk_elements)
    row = done = 0
    total = n * (n - 1) // 2
    bar = tqdm(total=total, desc="scoring pairs", unit="pair", unit_scale=True, disable=None if progress else True)
    while row < n - 1:
        cols = n - row - 1
        rows = max(1, min(cols, budget // cols))
        stop, count = row + rows, rows * cols - rows * (rows - 1) // 2
        mask = torch.ones(rows, cols, dtype=torch.bool, device=device).triu_()
        block_rows, block_cols = (slice(row, stop), None), (None, slice(row + 1, None))
        prob, logit = _head_means(distance, projected, block_rows, block_cols, amp)
        cos = (norm[row:stop] @ norm[row + 1 :].t())[mask]
        same = (labels[row:stop, None] == labels[None, row + 1 :])[mask]
        yield done, prob[mask], logit[mask], cos, same
        bar.update(count)
        row, done = stop, done + count
    bar.close()


def score_all_pairs(distance, emb, labels, amp=False, chunk_elements=None, progress=False, scorers=None):
    """Scores of all N(N-1)/2 pairs i < j, row-major (itertools.combinations order), held on emb's device.

    emb: (N, emb), labels: (N,) -> ({scorer name: (pairs,) float32 tensor}, target (pairs,) bool). For
    large N, `all_pairs_table` keeps them compactly on the CPU instead. `scorers` default: SCORERS.
    """
    scorers = scorers or SCORERS
    device, n = emb.device, len(emb)
    total = n * (n - 1) // 2
    prob, logit, cos = (torch.empty(total, device=device) for _ in range(3))
    same = torch.empty(total, dtype=torch.bool, device=device)
    for start, *results in all_pairs_blocks(distance, emb, labels, amp, chunk_elements, progress):
        part = slice(start, start + len(results[0]))
        prob[part], logit[part], cos[part], same[part] = results
    block = PairBlock(scorers, prob, logit, cos, lambda: tuple(torch.triu_indices(n, n, 1, device=device)))
    return {s.name: block[s.name] for s in scorers}, same


def evaluate_scores(scores, target, p_targets=(0.01, 0.05)):
    """{scorer: scores} and target flags -> {scorer: {eer, mindcf_*, auc}} (scores held whole, e.g. on a GPU)."""
    return {name: compute_metrics(values, target, p_targets) for name, values in scores.items()}


# ----------------------------------------------------------------------------- scored pairs, kept compactly


class PairTable:
    """Scored pairs held on the CPU in 12.125 bytes each: the BASE results prob, logit, cos (P,) float32, kept
    as pieces of PIECE pairs (so they can be freed piece by piece, see `release`), and the target flags,
    packed 8 to a byte (`labels(start, stop)`).

    The items of pair k are (idx_a[k], idx_b[k]) for trial lists, or, for all pairs of `n_items` items,
    computed from k (combinations order), so all pairs need no index arrays. `ids`: each item's name
    (None: the item index is its name). Scorer columns are computed from the table a chunk at a time.
    prob, logit, cos: whole (P,) arrays or lists of PIECE-long pieces.
    """

    def __init__(self, prob, logit, cos, target, ids=None, idx=None, n_items=None, piece=PIECE):
        self.piece = piece
        if isinstance(target, tuple):  # (packed bits, pairs) from all_pairs_table
            self._bits, self._len = target
        else:
            target = np.asarray(target, dtype=bool)
            self._bits, self._len = np.packbits(target), len(target)
        self.n_targets = int(np.bitwise_count(self._bits).sum(dtype=np.int64))  # packbits pads with zeros
        self.base = {}
        for name, values in zip(BASE, (prob, logit, cos)):
            pieces = (
                values if isinstance(values, list) else [values[k : k + piece] for k in range(0, len(target), piece)]
            )
            self.base[name] = pieces
        self.ids = None if ids is None else np.asarray(ids, dtype=object)
        self.idx = idx
        self.n_items = n_items
        if idx is None:  # all pairs: pair position of (i, i + 1) for each row i
            rows = np.arange(n_items, dtype=np.int64)
            self._row_start = rows * n_items - rows * (rows + 1) // 2

    def __len__(self):
        return self._len

    def labels(self, start, stop):
        """Target flags of the pairs start..stop-1: (stop - start,) bool (kept packed, 1 bit a pair)."""
        first = start // 8
        bits = np.unpackbits(self._bits[first : (stop + 7) // 8])
        return bits[start - 8 * first : stop - 8 * first].view(bool)

    @property
    def target(self):
        """Target flags of every pair: (P,) bool."""
        return self.labels(0, len(self))

    def indices(self, start, stop):
        """Items (idx_a, idx_b) of the pairs start..stop-1: (stop - start,) int64 arrays."""
        if self.idx is not None:
            return self.idx[0][start:stop], self.idx[1][start:stop]
        k = np.arange(start, stop, dtype=np.int64)
        a = np.searchsorted(self._row_start, k, side="right") - 1
        return a, k - self._row_start[a] + a + 1

    def names(self, start, stop):
        """The item names of pairs start..stop-1 (ids, or item indices when the table has no ids)."""
        a, b = self.indices(start, stop)
        return (a, b) if self.ids is None else (self.ids[a], self.ids[b])

    def _values(self, name, start, stop):
        """Base result `name` of the pairs start..stop-1: a view within one piece, else a copy."""
        pieces = self.base[name]
        if start >= stop:
            return np.empty(0, dtype=np.float32)
        size = self.piece
        first, last = start // size, (stop - 1) // size
        if first == last:
            return pieces[first][start - first * size : stop - first * size]
        parts = [pieces[k][max(start - k * size, 0) : stop - k * size] for k in range(first, last + 1)]
        return np.concatenate(parts)

    def _tensor(self, name, start, stop):
        return torch.from_numpy(self._values(name, start, stop))

    def whole(self, name):
        """Base result `name` of every pair as one (P,) float32 array."""
        return self._values(name, 0, len(self)) if len(self) else np.empty(0, dtype=np.float32)

    def release(self, name, piece=None):
        """Free base result `name` (one piece of it, or all): for metrics that consume what nothing needs later."""
        if piece is None:
            self.base[name] = [None] * len(self.base[name])
        else:
            self.base[name][piece] = None

    def reads(self, scorers, name):
        """Which BASE results scorer `name` reads (directly or through other scorers), from one pair."""
        block = self.block(scorers, 0, min(1, len(self)))
        block[name]
        return block.reads

    def block(self, scorers, start, stop):
        """A PairBlock of the pairs start..stop-1 (CPU tensors sharing the table's memory)."""
        prob, logit, cos = (functools.partial(self._tensor, name, start, stop) for name in BASE)

        def indices():
            return tuple(torch.from_numpy(np.ascontiguousarray(i)) for i in self.indices(start, stop))

        return PairBlock(scorers, prob, logit, cos, indices)

    def chunks(self, chunk=CHUNK):
        return ((start, min(start + chunk, len(self))) for start in range(0, len(self), chunk))

    def column(self, scorers, name, chunk=CHUNK):
        """Scorer `name`'s scores of every pair: (P,) float32 numpy."""
        out = np.empty(len(self), dtype=np.float32)
        for start, stop in self.chunks(chunk):
            out[start:stop] = as_float32(self.block(scorers, start, stop)[name])
        return out


def release_free_memory():
    """Hand memory freed inside the C heap back to the system (glibc's malloc_trim; a no-op elsewhere).

    Buffers of a few MB (embedding batches, projections) are freed into the heap, not unmapped; before
    a large all-pairs table this keeps them from adding to the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def all_pairs_table(distance, emb, labels, amp=False, chunk_elements=None, progress=False, ids=None, piece=PIECE):
    """All N(N-1)/2 pairs of emb (N, emb) with labels (N,) scored into a PairTable (12.125 bytes a pair)."""
    n = len(emb)
    total = n * (n - 1) // 2
    pieces = [[np.empty(min(piece, total - k), dtype=np.float32) for k in range(0, total, piece)] for _ in BASE]
    bits, pending = np.zeros((total + 7) // 8, dtype=np.uint8), np.zeros(0, dtype=bool)
    for start, *results in all_pairs_blocks(distance, emb, labels, amp, chunk_elements, progress):
        values = [x.cpu().numpy() for x in results]
        stop = start + len(values[0])
        pending = np.concatenate([pending, values[3]])  # flags from the last whole byte on
        whole = len(pending) // 8 * 8 if stop < total else len(pending)
        packed = np.packbits(pending[:whole])
        bits[(stop - len(pending)) // 8 :][: len(packed)] = packed
        pending = pending[whole:]
        for k in range(start // piece, (stop - 1) // piece + 1 if stop > start else 0):
            lo, hi = max(start, k * piece), min(stop, (k + 1) * piece)
            for out, x in zip(pieces, values):
                out[k][lo - k * piece : hi - k * piece] = x[lo - start : hi - start]
    return PairTable(*pieces, (bits, total), ids=ids, n_items=n, piece=piece)


def trials_table(distance, emb, idx_a, idx_b, target, amp=False, chunk_elements=None, ids=None):
    """The trials (emb[idx_a[k]], emb[idx_b[k]]) with target flags (trials,) scored into a PairTable."""
    results = trial_results(distance, emb, idx_a, idx_b, amp, chunk_elements)
    prob, logit, cos = (x.cpu().numpy() for x in results)
    idx = tuple(np.asarray(i, dtype=np.int64) for i in (idx_a, idx_b))
    target = np.asarray(target.cpu() if torch.is_tensor(target) else target, dtype=bool)
    return PairTable(prob, logit, cos, target, ids=ids, idx=idx)


# ----------------------------------------------------------------------------- score files


def write_score_file(path, enroll, test, scores, target, metrics=None, scorers=None, provenance=None):
    """Write `# enroll test <columns> label`, then one trial per line, `enroll test <scores> target|nontarget`.

    `enroll`, `test`: ids (strings or ints); `scores`: {name: (trials,) array or tensor}; formats from the
    scorers of the same names (SCORERS by default, else %.7g). `metrics`, if given, goes to `<path>.json`;
    `provenance` (checkpoints.provenance_of), if given, to a first line `# provenance {json}`.
    """
    known = {s.name: s for s in (scorers or SCORERS)}
    names = list(scores)
    formats = [known[n].fmt if n in known else "%.7g" for n in names]
    labels = np.asarray(target.detach().cpu() if torch.is_tensor(target) else target, dtype=bool)
    columns = [as_float32(scores[n]) for n in names]
    enroll, test = np.asarray(enroll), np.asarray(test)

    def chunks():
        for start in range(0, len(labels), CHUNK):
            part = slice(start, start + CHUNK)
            yield enroll[part], test[part], [c[part] for c in columns], labels[part]

    _write_text(path, names, formats, chunks(), provenance)
    if metrics is not None:
        write_json(path + ".json", metrics)


PROVENANCE_LINE = "# provenance "  # a score file's optional first line: the model that made it, as JSON


def check_finite(names, columns):
    """UserError when a score column holds NaN or Inf: no score file (or metric) is made of such scores."""
    for name, column in zip(names, columns):
        if not np.isfinite(column).all():
            raise UserError(
                f"the {name} scores hold NaN or Inf (its back-end or embeddings gave non-finite values); "
                "nothing was written"
            )


def _write_text(path, names, formats, chunks, provenance=None):
    """The text score file from chunks of (enroll ids, test ids, [columns], labels), written atomically; a
    chunk with a non-finite score stops the write (the partial file is removed)."""
    line = " ".join(["%s %s", *formats, "%s"]) + "\n"
    with atomic_write(path) as handle:
        if provenance is not None:
            handle.write(PROVENANCE_LINE + json.dumps(provenance, sort_keys=True) + "\n")
        handle.write("# enroll test " + " ".join(names) + " label\n")
        for enroll, test, columns, labels in chunks:
            check_finite(names, columns)
            words = np.where(labels, "target", "nontarget").tolist()
            rows = zip(enroll.tolist(), test.tolist(), *(c.tolist() for c in columns), words)
            handle.writelines(line % row for row in rows)


def _table_chunks(table, scorers, chunk=CHUNK):
    for start, stop in table.chunks(chunk):
        block = table.block(scorers, start, stop)
        enroll, test = table.names(start, stop)
        yield enroll, test, [as_float32(block[s.name]) for s in scorers], table.labels(start, stop)


def _write_npy_entry(archive, name, dtype, length, parts):
    """One `<name>.npy` member of an uncompressed .npz, its (length,) data written part by part."""
    with archive.open(name + ".npy", "w", force_zip64=True) as handle:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
        np.lib.format.write_array_header_2_0(handle, header)
        for part in parts:
            handle.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


def _finite_parts(name, parts):
    for part in parts:
        check_finite([name], [part])
        yield part


def write_table_npz(path, table, scorers, chunk=WRITE_CHUNK, provenance=None):
    """The compact score file: an uncompressed .npz (np.load reads it) holding `<scorer>.npy` float32 columns,
    `label.npy` (bool), `enroll.npy` and `test.npy` (int32 indices into `ids.npy`, int64 beyond 2^31 items),
    `ids.npy` (item names, str) and, when given, `provenance.npy` (0-d str: the model that made it, as JSON).
    A non-finite score stops the write (the partial file is removed)."""
    n = len(table)
    ids = table.ids if table.ids is not None else np.arange(table.n_items or 0)
    index_type = np.int32 if len(ids) < 2**31 else np.int64
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for side in (0, 1):
            parts = (table.indices(a, b)[side] for a, b in table.chunks(chunk))
            _write_npy_entry(archive, ("enroll", "test")[side], index_type, n, parts)
        _write_npy_entry(archive, "label", bool, n, (table.labels(a, b) for a, b in table.chunks(chunk)))
        for s in scorers:
            parts = (as_float32(table.block(scorers, a, b)[s.name]) for a, b in table.chunks(chunk))
            _write_npy_entry(archive, s.name, np.float32, n, _finite_parts(s.name, parts))
        names = np.asarray([str(i) for i in ids])
        _write_npy_entry(archive, "ids", names.dtype if len(names) else "<U1", len(names), (names,))
        if provenance is not None:
            with archive.open("provenance.npy", "w") as handle:
                np.lib.format.write_array(handle, np.asarray(json.dumps(provenance, sort_keys=True)))


def read_table_npz(path):
    """A score .npz back as ({scorer: (P,) float32}, labels (P,) bool, enroll ids, test ids)."""
    with np.load(path, allow_pickle=False) as data:
        ids = data["ids"]
        special = {"enroll", "test", "label", "ids", "provenance"}
        columns = {name: data[name] for name in data.files if name not in special}
        return columns, data["label"], ids[data["enroll"]], ids[data["test"]]


# ----------------------------------------------------------------------------- reports


def all_metrics(table, scorers, consume=False):
    """{scorer: metrics} of a PairTable. With `consume`, each base result (BASE) is freed once no scorer left
    needs it, and a scorer that is the last to need its only base result sorts in the memory that result
    held: the peak stays near the table's 13 bytes a pair (the table is spent afterwards)."""
    reads = {s.name: table.reads(scorers, s.name) for s in scorers}
    left, results = list(scorers), {}
    while left:
        users = {name: [s for s in left if name in reads[s.name]] for name in BASE}
        sole = [s for s in left if len(reads[s.name]) == 1 and users[next(iter(reads[s.name]))] == [s]]
        scorer = sole[0] if consume and sole else left[0]
        eaten = next(iter(reads[scorer.name])) if consume and sole else None
        results[scorer.name] = table_metrics(table, scorers, scorer.name, P_TARGETS, scorer.is_llr, consume=eaten)
        left.remove(scorer)
        for name in BASE:
            if consume and not any(name in reads[s.name] for s in left):
                table.release(name)
    return {s.name: results[s.name] for s in scorers}


def report(
    table,
    scorers=None,
    out_path=None,
    extra=None,
    plot=False,
    verbose=True,
    line=None,
    score_format="text",
    provenance=None,
):
    """Metrics of a PairTable for every scorer, printed as tables (EER / minDCF / AUC for all, Cllr / minCllr
    / actDCF for the LLR scorers); with `out_path` the score file (`score_format` 'text', 'npy', or None for
    none), its JSON summary `<out_path>.json` and (with `plot`) DET curves and histograms beside it. The
    score file is written first; the metrics then spend the table (see all_metrics) unless `plot`.

    `extra` adds counts to the summary (e.g. {'items': N}); `line` is the first printed line, a format
    string over the summary's counts; `provenance` (checkpoints.provenance_of of the model that scored)
    goes into the score file and the summary. Returns {scorer: metrics}. Non-finite scores are a UserError,
    before anything is written.
    """
    scorers = scorers or SCORERS
    if out_path and score_format == "text":
        chunks = _table_chunks(table, scorers, WRITE_CHUNK)
        _write_text(out_path, [s.name for s in scorers], [s.fmt for s in scorers], chunks, provenance)
    elif out_path and score_format == "npy":
        write_table_npz(out_path, table, scorers, provenance=provenance)
    try:
        metrics = all_metrics(table, scorers, consume=not plot)
    except NonFiniteScores as err:
        raise UserError(f"{err}: a back-end or the embeddings gave non-finite values; nothing was written") from None
    summary = {"trials": len(table), "targets": table.n_targets, **(extra or {})}
    if provenance is not None:
        summary["provenance"] = provenance
    summary["columns"] = [s.name for s in scorers]  # the score file's order (the JSON's keys are sorted)
    summary["scorers"] = {s.name: {"is_llr": s.is_llr, "help": s.help} for s in scorers}
    summary["metrics"] = metrics
    if out_path:
        write_json(out_path + ".json", summary)
    if out_path and plot:
        from e2e_verification import plots

        for s in scorers:  # one column in memory at a time
            column = {s.name: table.column(scorers, s.name)}
            plots.write_plots(out_path, column, table.target, {s.name: metrics[s.name]}, {s.name: s.title})
    if verbose:
        print((line or "{trials} trials ({targets} target)").format(**summary))
        print(format_table(metrics, ROC_KEYS))
        llr = {s.name: metrics[s.name] for s in scorers if s.is_llr}
        if llr:
            print(format_table(llr, LLR_KEYS))
        if out_path:
            kind = {"text": "scores: ", "npy": "scores (npz): "}.get(score_format)
            print(f"{kind}{out_path}  metrics: {out_path}.json" if kind else f"metrics: {out_path}.json")
        if out_path and plot:
            print(f"plots: {out_path}.<scorer>_det.png and {out_path}.<scorer>_hist.png")
    return metrics


def run_image_eval(
    model,
    dataset,
    device,
    batch_size,
    out_path=None,
    amp=False,
    verbose=True,
    plot=False,
    backends=None,
    score_format="text",
    embed_cohort=None,
    provenance=None,
):
    """All-pairs evaluation of an image dataset: prints and returns {scorer: metrics}; optional score file
    (and, with `plot`, DET curves and score histograms beside it). `backends` (backends.Backends) adds scorers;
    `embed_cohort(path)` -> (c, emb) embeds their cohort."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    emb, labels = embed_loader(model, loader, device, amp=amp, progress=verbose)
    scorers = backends.scorers(model, emb, embed_cohort, amp) if backends is not None else SCORERS
    release_free_memory()  # the embedding's freed buffers, before the table's N(N-1)/2 pairs
    table = all_pairs_table(model.distance, emb, labels, amp=amp, progress=verbose)
    release_free_memory()
    line = "{items} test items, {trials} trials ({targets} target)"
    return report(table, scorers, out_path, {"items": len(emb)}, plot, verbose, line, score_format, provenance)


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
    one matrix at a time, so it can stream from disk; embeddings are returned on `device`. Matrices
    are tiled to at least the encoder's own minimum (`min_frames` attribute, e.g. the TDNN's 5) too.
    """
    model.eval()
    min_frames = max(min_frames, getattr(model.encoder, "min_frames", 1))
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
