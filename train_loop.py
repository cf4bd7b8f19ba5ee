"""The one training loop: joint AM-softmax + learned-distance steps, validation, checkpoints, logging.

Resume is exact: the batch order is a function of (seed, epoch) and every RNG is re-seeded from
(seed, epoch) at the start of each epoch, so training from a checkpoint written at the end of epoch
N repeats bit for bit what an uninterrupted run does from there (on the same device and settings).
"""

import math
import os
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import CHECKPOINT_FORMAT, load_checkpoint, load_weights, save_checkpoint
from losses import label_smoothing_ce, pair_loss
from scoring import embed_loader, evaluate_scores, score_all_pairs
from utils import UserError, seed_everything

HISTORY_KEYS = ("train_loss", "ce_loss", "bin_loss", "e2e_eer", "cos_eer", "fus_eer", "lr")


@dataclass(frozen=True)
class TrainConfig:
    """What the training loop reads, built once from the resolved arguments (`from_args`)."""

    epochs: int
    checkpoint_path: str
    seed: int = 1
    smoothing: float = 0.0
    ablation: bool = False
    amp: bool = False
    max_gnorm: float = 0.0
    margin_warmup_epochs: int = 0
    cp_name: str | None = None
    save_every: int = 1
    keep_checkpoints: int = 0
    no_cp: bool = False
    valid_max_items: int | None = None
    verbose: int = 1
    progress: bool = False
    record: dict = field(default_factory=dict)  # the run's arguments, stored in every checkpoint

    @classmethod
    def from_args(cls, args, **overrides):
        """The fields of this config taken from a namespace (extra attributes are ignored)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})


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


@torch.no_grad()
def validate(model, loader, device, amp=False, progress=False, max_items=None):
    """Embed the validation items, score all pairs among them, return {scorer: EER}.

    Validation uses fixed inputs (no random crops), so the model-selection EER is deterministic.
    """
    raw = model.module if hasattr(model, "module") else model
    emb, labels = embed_loader(raw, loader, device, amp=amp, progress=progress, desc="validation")
    if max_items is not None and len(emb) > max_items:
        emb, labels = emb[:max_items], labels[:max_items]
    scores, target = score_all_pairs(raw.distance, emb, labels, amp=amp)
    if target.all() or not target.any():
        raise UserError("the validation set needs at least two classes and one class with two items")
    return {name: m["eer"] for name, m in evaluate_scores(scores, target, p_targets=()).items()}


class TrainLoop:
    """Fits a Verifier; see `fit`. `scheduler_kind` is 'noam' (stepped per batch) or 'plateau' (per epoch).

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
        self.epoch = 0
        self.total_iters = 0
        self.history = {k: [] for k in HISTORY_KEYS}
        self.best = {"e2e": math.inf, "cos": math.inf}
        self.last_checkpoint = None
        self.best_checkpoint = None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_file(self, epoch):
        name = self.cfg.cp_name or f"checkpoint_{epoch}ep.pt"
        return os.path.join(self.cfg.checkpoint_path, name)

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
            "args": self.cfg.record,
        }

    def save(self):
        if self.rank != 0 or self.cfg.no_cp:
            return
        path = self.checkpoint_file(self.epoch)
        save_checkpoint(path, self.state())
        self.last_checkpoint = path
        if self.history["e2e_eer"] and self.history["e2e_eer"][-1] <= self.best["e2e"]:
            self.best_checkpoint = path
        if self.cfg.keep_checkpoints and not self.cfg.cp_name:
            self.prune_checkpoints()

    def prune_checkpoints(self):
        """Delete epoch checkpoints older than the newest `keep_checkpoints`, sparing the best e2e one."""
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
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.epoch = state["epoch"]
        self.total_iters = state["total_iters"]
        self.history = {k: list(state["history"].get(k, [])) for k in HISTORY_KEYS}
        self.best = dict(state["best"])
        self.last_checkpoint = path

    # ------------------------------------------------------------------ steps

    def train_step(self, x, y):
        """One optimisation step on a class-balanced batch; returns (total, ce, bin, grad_norm) as floats."""
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.crop is not None:
            x = self.crop(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits, pair_logits, same = self.model(x, y)
        ce = label_smoothing_ce(logits.float(), y, cfg.smoothing)
        bce = pair_loss(pair_logits.float(), same, cfg.smoothing)
        loss = bce if cfg.ablation else ce + bce
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
        seed_everything(self.cfg.seed * 100_003 + self.epoch)
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
            eers = {"e2e": math.nan, "cos": math.nan, "fus": math.nan}
            if self.valid_loader is not None:
                if self.rank == 0:  # with several processes rank 0 validates and shares the EERs
                    eers = validate(
                        self.model, self.valid_loader, self.device, cfg.amp, cfg.progress, cfg.valid_max_items
                    )
                eers = dict(zip(eers, agree_across_ranks(eers.values(), self.device, average=False)))
                for name in ("e2e", "cos"):
                    if eers[name] < self.best[name]:
                        self.best[name] = eers[name]
                        improved = True
                if self.scheduler_kind == "plateau":
                    self.scheduler.step(min(eers["e2e"], eers["cos"]))
            elif self.scheduler_kind == "plateau":
                self.scheduler.step(loss)
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            for key, value in zip(HISTORY_KEYS, (loss, ce, bce, eers["e2e"], eers["cos"], eers["fus"], lr)):
                self.history[key].append(float(value))
            self.log_epoch(loss, eers, lr, time.time() - start)
            # A fixed --cp-name (one file per hp-search trial) keeps the best validated model, as the seed did.
            periodic = self.epoch % cfg.save_every == 0 or self.epoch == cfg.epochs
            if improved or (periodic and not (cfg.cp_name and self.valid_loader is not None)):
                self.save()
        return self.best["e2e"], self.best["cos"]

    def log_epoch(self, loss, eers, lr, seconds):
        if self.rank != 0:
            return
        if self.writer is not None:
            for name, tag in (("e2e", "E2E"), ("cos", "Cosine"), ("fus", "Fus")):
                if not math.isnan(eers[name]):
                    self.writer.add_scalar(f"Valid/{tag} EER", eers[name], self.total_iters)
            for name, tag in (("e2e", "E2E"), ("cos", "Cosine")):
                if math.isfinite(self.best[name]):
                    self.writer.add_scalar(f"Valid/Best {tag} EER", self.best[name], self.total_iters)
            self.writer.flush()
        if self.cfg.verbose > 0:
            print(
                f"epoch {self.epoch:4d}  loss {loss:.4f}  e2e EER {eers['e2e']:.4f}  cos EER {eers['cos']:.4f}  "
                f"fus EER {eers['fus']:.4f}  lr {lr:.3g}  ({seconds:.1f} s)",
                flush=True,
            )
