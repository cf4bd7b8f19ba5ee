"""The one training loop: joint AM-softmax + learned-distance steps, validation, checkpoints, logging.

Resume is exact: the batch order is a function of (seed, epoch) and every RNG is re-seeded from
(seed, epoch) at the start of each epoch (the training loader's worker processes too: they start
afresh each epoch, seeded through the loader's generator), so training from a checkpoint written at the end of epoch
N repeats bit for bit what an uninterrupted run does from there (on the same device and settings).
"""

import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from e2e_verification.calibration import fit_calibration
from e2e_verification.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, load_weights, save_checkpoint
from e2e_verification.scoring import SCORERS, VALIDATION_SCORERS, embed_loader, evaluate_scores, score_all_pairs
from losses import DEFAULT_PAIR_LOSS, PAIR_LOSSES, label_smoothing_ce
from utils import UserError, seed_everything

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)ep\.pt")  # checkpoint_file's name for an epoch

# One `<scorer>_eer` per validated scorer of scoring.SCORERS (e2e, cos, fus).
HISTORY_KEYS = ("train_loss", "ce_loss", "bin_loss", *(f"{s.name}_eer" for s in VALIDATION_SCORERS), "lr")
SELECTION_SCORERS = tuple(s.name for s in VALIDATION_SCORERS)  # --select-by: the validated scorers
DEFAULT_SELECTION = "e2e"  # the research code's: the best checkpoint has the lowest validation e2e EER


def best_epoch(history, scorer):
    """The 1-based epoch of the lowest `<scorer>_eer` in `history` (the latest on ties); None if none is finite."""
    eers = history.get(f"{scorer}_eer", [])
    finite = [(eer, epoch) for epoch, eer in enumerate(eers, 1) if math.isfinite(eer)]
    if not finite:
        return None
    lowest = min(eer for eer, _ in finite)
    return max(epoch for eer, epoch in finite if eer == lowest)


@dataclass(frozen=True)
class TrainConfig:
    """What the training loop reads, built once from the resolved arguments (`from_args`)."""

    epochs: int
    checkpoint_path: str
    seed: int = 1
    smoothing: float = 0.0
    ablation: bool = False
    pair_weight: float = 1.0  # weight of the pair loss beside the classification loss (0: distance untrained)
    pair_loss: str = DEFAULT_PAIR_LOSS  # the learned distance's objective, a key of losses.PAIR_LOSSES
    cos_correction_penalty: float = 1e-2  # weight of the `cos` distance's mean squared correction (0 for others)
    amp: bool = False
    max_gnorm: float = 0.0
    margin_warmup_epochs: int = 0
    cp_name: str | None = None
    # --select-by: the validated scorer whose EER picks the best checkpoint; None = the research code's rule (the
    # best by e2e, and a save whenever e2e or cos improves, which matters under --cp-name and --save-every)
    select_by: str | None = None
    save_every: int = 1
    keep_checkpoints: int = 0
    no_cp: bool = False
    verbose: int = 1
    progress: bool = False
    record: dict = field(default_factory=dict)  # the run's arguments, stored in every checkpoint

    @classmethod
    def from_args(cls, args, **overrides):
        """The fields of this config taken from a namespace (extra attributes are ignored)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    @property
    def selection(self):
        """The scorer whose validation EER picks the best checkpoint (--select-by, default e2e)."""
        return self.select_by or DEFAULT_SELECTION


def noam_factor(warmup):
    """The seed's Transformer-style LR multiplier: lr_t = lr * min(t^-0.5, t * warmup^-1.5), t = 1, 2, ..."""

    def factor(step):
        t = step + 1
        return min(t**-0.5, t * warmup**-1.5)

    return factor


def agree_across_ranks(values, device, average):
    """Make per-process floats equal under DistributedDataParallel: their mean over ranks, or rank 0's.

    A no-op in a single process. The plateau scheduler and checkpoint choices read these values, so
    every rank must see the same ones.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    shared = torch.tensor(list(values), dtype=torch.float64, device=device)
    if average:
        dist.all_reduce(shared)
        shared /= dist.get_world_size()
    else:
        dist.broadcast(shared, 0)
    return shared.tolist()


# The calibration a checkpoint carries, fitted on its validation pairs: each of these LLR-like scores alone and
# their fusion, at this prior (eval.py and verify.py use it when no --calibration is given).
CALIBRATED = ("e2e_logit", "cos")
CALIBRATION_P_TARGET = 0.5


@torch.no_grad()
def validate(model, loader, device, amp=False, progress=False, classes=None):
    """Embed the validation items, score all pairs among them: -> ({scorer: EER}, calibration or None).

    Validation uses fixed inputs (no random crops), so the model-selection EER is deterministic; the
    items were chosen (and capped by --valid-max-items) when the data was built (data_load.validation_subset).
    The calibration (see `validation_calibration`) is fitted on the same pairs; `classes` says what they are.
    """
    raw = model.module if hasattr(model, "module") else model
    emb, labels = embed_loader(raw, loader, device, amp=amp, progress=progress, desc="validation")
    scorers = (*VALIDATION_SCORERS, *(s for s in SCORERS if s.name in CALIBRATED and not s.validate))
    scores, target = score_all_pairs(raw.distance, emb, labels, amp=amp, scorers=scorers)
    if target.all() or not target.any():
        raise UserError("the validation set needs at least two classes and one class with two items")
    validated = {s.name: scores[s.name] for s in VALIDATION_SCORERS}
    eers = {name: m["eer"] for name, m in evaluate_scores(validated, target, p_targets=()).items()}
    return eers, validation_calibration(scores, target, classes)


def validation_calibration(scores, target, classes=None):
    """calibration.fit_calibration's parameters for CALIBRATED alone and fused, fitted on the validation pairs
    (scores: {name: (pairs,) tensor}, target: (pairs,) bool), with how many trials they came from and, when
    known, `classes` (data_load.validation_classes: how many validation classes, whether held out)."""
    columns = {name: scores[name].double().cpu().numpy() for name in CALIBRATED}
    labels = target.cpu().numpy()
    params = fit_calibration(columns, labels, CALIBRATION_P_TARGET, fusions=[list(CALIBRATED)], scorers=CALIBRATED)
    params["fitted_on"] = {"what": "validation pairs", "trials": int(len(labels)), "targets": int(labels.sum())}
    params["fitted_on"].update(classes or {})
    return params


def _listed(names, shown=8):
    """A list of class names for a message, its first `shown` only when longer."""
    if not names:
        return "no classes"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def check_same_holdout(path, trained, record):
    """Refuse to resume checkpoint `path` (whose run arguments are `trained`) in a run that holds out other classes
    for validation (--holdout-classes, drawn with --seed) than it did: they would have been trained on."""
    old, new = trained.get("holdout_class_names"), record.get("holdout_class_names")
    if (old or None) != (new or None):
        raise UserError(
            f"{path} was trained holding out {_listed(old)} for validation, but this run holds out {_listed(new)}; "
            "resume with the checkpoint's --holdout-classes and --seed"
        )


class TrainLoop:
    """Fits a VerifierModel; see `fit`. `scheduler_kind` is 'noam' (stepped per batch) or 'plateau' (per epoch).

    `cfg` is a TrainConfig; `crop` (the task's training-time crop) maps each input batch before the step.
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        scheduler_kind,
        train_loader,
        valid_loader,
        device,
        cfg,
        writer=None,
        rank=0,
        crop=None,
        valid_classes=None,
    ):
        self.model = model
        self.raw_model = model.module if hasattr(model, "module") else model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_kind = scheduler_kind
        self.train_loader = train_loader
        self.valid_loader = valid_loader
        self.device = device
        self.cfg = cfg
        self.writer = writer
        self.rank = rank
        self.crop = crop
        # {"classes": how many the validation set holds, "held_out": none of them trained on}, recorded in the
        # calibration's "fitted_on" (data_load.validation_classes; None: not known, e.g. data given in memory)
        self.valid_classes = valid_classes
        self.epoch = 0
        self.total_iters = 0
        self.history = {k: [] for k in HISTORY_KEYS}
        self.best = {name: math.inf for name in SELECTION_SCORERS}  # the lowest validation EER of each scorer
        self.calibration = None  # the last validation's calibration (validation_calibration), saved with the weights
        self.last_checkpoint = None
        self.best_checkpoint = None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_file(self, epoch):
        name = self.cfg.cp_name or f"checkpoint_{epoch}ep.pt"
        return os.path.join(self.cfg.checkpoint_path, name)

    def newest_checkpoint(self):
        """The checkpoint to resume from: the --cp-name file, or the highest checkpoint_<N>ep.pt; None if none."""
        if self.cfg.cp_name:
            path = self.checkpoint_file(0)
            return path if os.path.exists(path) else None
        names = os.listdir(self.cfg.checkpoint_path) if os.path.isdir(self.cfg.checkpoint_path) else []
        epochs = [int(m.group(1)) for m in map(CHECKPOINT_NAME.fullmatch, names) if m]
        return self.checkpoint_file(max(epochs)) if epochs else None

    def state(self):
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.raw_model.config,
            "model_state": self.raw_model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scheduler_kind": self.scheduler_kind,
            "epoch": self.epoch,
            "total_iters": self.total_iters,
            "history": self.history,
            "best": self.best,
            # the file holding the best validation EER of `select_by` (None: e2e) so far (a name in checkpoint_path),
            # kept by pruning
            "best_checkpoint": os.path.basename(self.best_checkpoint) if self.best_checkpoint else None,
            "select_by": self.cfg.select_by,
            "args": self.cfg.record,
            # fitted on this epoch's validation pairs (None without validation): eval.py's and verify.py's default
            "calibration": self.calibration,
        }

    def save(self):
        if self.rank != 0 or self.cfg.no_cp:
            return
        path = self.checkpoint_file(self.epoch)
        if best_epoch(self.history, self.cfg.selection) == self.epoch:
            self.best_checkpoint = path  # recorded in this very checkpoint, so a resumed run still knows it
        elif path == self.best_checkpoint:  # a --cp-name file overwritten by a later, not-best epoch
            self.best_checkpoint = None
        save_checkpoint(path, self.state())
        self.last_checkpoint = path
        if self.cfg.keep_checkpoints and not self.cfg.cp_name:
            self.prune_checkpoints()

    def prune_checkpoints(self):
        """Delete epoch checkpoints older than the newest `keep_checkpoints`, sparing the best one (--select-by)
        (remembered across resumes: it is recorded in every checkpoint and restored by `load`)."""
        kept = {self.best_checkpoint}
        epochs = sorted(e for e in range(1, self.epoch + 1) if os.path.exists(self.checkpoint_file(e)))
        kept.update(self.checkpoint_file(e) for e in epochs[-self.cfg.keep_checkpoints :])
        for e in epochs:
            path = self.checkpoint_file(e)
            if path not in kept:
                os.remove(path)

    def load(self, path):
        """Restore everything from a checkpoint written by `save` (weights-only load)."""
        state = load_checkpoint(path, map_location=self.device)
        load_weights(self.raw_model, state, path)
        kind = state.get("scheduler_kind")
        if kind != self.scheduler_kind:
            raise UserError(
                f"{path} was trained with --lr-schedule {kind}, not {self.scheduler_kind}; resume with "
                f"--lr-schedule {kind}"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer_state"])
            self.scheduler.load_state_dict(state["scheduler_state"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise UserError(f"{path}: its optimizer state does not fit these flags ({err})") from None
        self.epoch = state["epoch"]
        self.total_iters = state["total_iters"]
        self.history = {k: list(state["history"].get(k, [])) for k in HISTORY_KEYS}
        self.best = {**self.lowest_eers(), **state["best"]}  # checkpoints from before fus was tracked lack it
        self.calibration = state.get("calibration")
        self.last_checkpoint = path
        self.keep_selection(path, state)
        check_same_holdout(path, state.get("args") or {}, self.cfg.record)
        best = state.get("best_checkpoint")
        if best is None and "best_checkpoint" not in state:  # written before the best file was recorded
            e2e = self.history["e2e_eer"]
            epochs = [i + 1 for i, eer in enumerate(e2e) if eer == self.best["e2e"]]
            best = os.path.basename(self.checkpoint_file(epochs[-1])) if epochs else None
        self.best_checkpoint = os.path.join(self.cfg.checkpoint_path, best) if best else None

    def lowest_eers(self):
        """{scorer: its lowest finite validation EER in the history, or inf}."""
        found = {name: [e for e in self.history[f"{name}_eer"] if math.isfinite(e)] for name in SELECTION_SCORERS}
        return {name: min(eers, default=math.inf) for name, eers in found.items()}

    def keep_selection(self, path, state):
        """A resumed run keeps the checkpoint's --select-by: adopted when not given, refused when another.

        Refused rather than recomputed from the history: the best file of another scorer may have been pruned
        (--keep-checkpoints), never written (--save-every) or overwritten (--cp-name).
        """
        stored = state.get("select_by")
        if self.cfg.select_by is None:
            self.cfg = replace(self.cfg, select_by=stored)
            self.cfg.record["select_by"] = stored
        elif self.cfg.select_by != (stored or DEFAULT_SELECTION):
            was = f"--select-by {stored}" if stored else f"the default --select-by {DEFAULT_SELECTION}"
            raise UserError(
                f"{path} chose its best checkpoint with {was}, not --select-by {self.cfg.select_by}; resume with "
                f"{was.removeprefix('the default ')}, or train into a new --checkpoint-path"
            )

    # ------------------------------------------------------------------ steps

    def train_step(self, x, y):
        """One optimisation step on a batch; returns (total, ce, bin, grad_norm) as floats."""
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.crop is not None:
            x = self.crop(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits, pair_logits, same = self.model(x, y)
        ce = label_smoothing_ce(logits.float(), y, cfg.smoothing)
        bce = PAIR_LOSSES[cfg.pair_loss](pair_logits.float(), same, cfg.smoothing)
        bce = bce + cfg.cos_correction_penalty * self.raw_model.distance.regulariser()  # 0 unless --pair-features cos
        if cfg.ablation:
            loss = bce
        elif cfg.pair_weight == 0:  # the distance gets no gradient at all (so SGD leaves it, decay included)
            loss = ce
        else:
            loss = ce + cfg.pair_weight * bce
        if not torch.isfinite(loss):
            kept = self.last_checkpoint or "none written yet"
            raise UserError(
                f"loss became {loss.item()} at epoch {self.epoch + 1}, step {self.total_iters + 1}; "
                f"stopping (last good checkpoint: {kept}); try a lower --lr or --max-gnorm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.max_gnorm if cfg.max_gnorm else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        if self.scheduler_kind == "noam":
            self.scheduler.step()
        self.total_iters += 1
        n_heads = pair_logits.shape[0]
        return loss.item(), ce.item(), bce.item() / n_heads, float(gnorm)

    def set_margin(self):
        """The margin schedule: the head's margin rises linearly from 0 to the configured one over
        cfg.margin_warmup_epochs epochs (a function of the epoch alone, so a resumed run agrees)."""
        head = self.raw_model.classifier
        if self.cfg.margin_warmup_epochs > 0 and hasattr(head, "set_margin"):
            full = self.raw_model.config["margin"]
            head.set_margin(full * min(1.0, self.epoch / self.cfg.margin_warmup_epochs))

    def train_epoch(self):
        seed = self.cfg.seed * 100_003 + self.epoch
        seed_everything(seed)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:  # it seeds the loader's worker processes, started anew each epoch
            generator.manual_seed(seed + 2**40)
        sampler = self.train_loader.batch_sampler
        sampler.set_epoch(self.epoch)
        self.set_margin()
        self.model.train()
        totals = [0.0, 0.0, 0.0]
        n = 0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            disable=not self.cfg.progress or self.rank != 0,
            leave=False,
        )
        for x, y in bar:
            loss, ce, bce, gnorm = self.train_step(x, y)
            for i, v in enumerate((loss, ce, bce)):
                totals[i] += v
            n += 1
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.writer is not None:
                step = self.total_iters
                self.writer.add_scalar("Train/Total loss", loss, step)
                self.writer.add_scalar("Train/Cross entropy", ce, step)
                self.writer.add_scalar("Train/Binary loss", bce, step)
                self.writer.add_scalar("Info/LR", self.optimizer.param_groups[0]["lr"], step)
                self.writer.add_scalar("Info/Grad norm", gnorm, step)
        n = max(n, 1)
        return [t / n for t in totals]

    # ------------------------------------------------------------------ fit

    def fit(self):
        """Train from `self.epoch` to cfg.epochs; returns the best e2e and cosine validation EERs."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            start = time.time()
            loss, ce, bce = agree_across_ranks(self.train_epoch(), self.device, average=True)
            improved = False
            eers = {s.name: math.nan for s in VALIDATION_SCORERS}
            if self.valid_loader is not None:
                if self.rank == 0:  # with several processes rank 0 validates and shares the EERs
                    eers, self.calibration = validate(
                        self.model, self.valid_loader, self.device, cfg.amp, cfg.progress, self.valid_classes
                    )
                eers = dict(zip(eers, agree_across_ranks(eers.values(), self.device, average=False)))
                improved = self.update_best(eers)
                if self.scheduler_kind == "plateau":
                    self.scheduler.step(min(eers["e2e"], eers["cos"]))
            elif self.scheduler_kind == "plateau":
                self.scheduler.step(loss)
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            values = {"train_loss": loss, "ce_loss": ce, "bin_loss": bce, "lr": lr}
            values.update((f"{name}_eer", eer) for name, eer in eers.items())
            for key in HISTORY_KEYS:
                self.history[key].append(float(values[key]))
            self.log_epoch(loss, eers, lr, time.time() - start)
            # A fixed --cp-name (one file per hp-search trial) keeps the best validated model (update_best).
            periodic = self.epoch % cfg.save_every == 0 or self.epoch == cfg.epochs
            if improved or (periodic and not (cfg.cp_name and self.valid_loader is not None)):
                self.save()
        return self.best["e2e"], self.best["cos"]

    def update_best(self, eers):
        """Record this epoch's validation `eers` ({scorer: EER}) in `best`; -> whether to save this epoch for it.

        Without --select-by, as the research code: when the e2e or the cos EER is a new low (so a --cp-name file
        may end up holding a cos improvement). With it: when the chosen scorer's EER is the lowest so far (ties
        too, so the file holds the latest of equal ones, as `best_epoch` picks).
        """
        before = dict(self.best)
        for name in self.best:
            self.best[name] = min(self.best[name], eers[name]) if math.isfinite(eers[name]) else self.best[name]
        if self.cfg.select_by is None:
            return any(eers[name] < before[name] for name in ("e2e", "cos"))
        eer = eers[self.cfg.select_by]
        return math.isfinite(eer) and eer <= self.best[self.cfg.select_by]

    def best_summary(self):
        """The line train.py prints at the end: the best checkpoint by the --select-by validation EER; None without
        validation."""
        if self.valid_loader is None:
            return None
        scorer = self.cfg.selection
        epoch = best_epoch(self.history, scorer)
        if epoch is None:
            return f"best checkpoint by validation {scorer} EER: none (no finite validation EER)"
        if self.best_checkpoint is not None:
            where = self.best_checkpoint
        elif self.cfg.no_cp:
            where = "not written (--no-cp)"
        elif self.cfg.cp_name:
            where = "not kept (the --cp-name file holds a later epoch whose cos EER improved; --select-by keeps it)"
        else:
            where = f"not kept (epoch {epoch} was not saved)"
        return f"best checkpoint by validation {scorer} EER {self.history[f'{scorer}_eer'][epoch - 1]:.4f}: {where}"

    def log_epoch(self, loss, eers, lr, seconds):
        if self.rank != 0:
            return
        if self.writer is not None:
            for scorer in VALIDATION_SCORERS:
                if not math.isnan(eers[scorer.name]):
                    self.writer.add_scalar(f"Valid/{scorer.tag} EER", eers[scorer.name], self.total_iters)
            for name, tag in (("e2e", "E2E"), ("cos", "Cosine")):
                if math.isfinite(self.best[name]):
                    self.writer.add_scalar(f"Valid/Best {tag} EER", self.best[name], self.total_iters)
            self.writer.flush()
        if self.cfg.verbose > 0:
            print(
                f"epoch {self.epoch:4d}  loss {loss:.4f}  "
                + "".join(f"{name} EER {eer:.4f}  " for name, eer in eers.items())
                + f"lr {lr:.3g}  ({seconds:.1f} s)",
                flush=True,
            )
