"""One training epoch and one captioning pass over a split (the inner loops of ``train.py``).

Training step (spec §8.4): the loss is the sum of the kept per-token losses divided by the kept-token count
of the whole global batch (one collective of four numbers per micro-batch), so N processes compute the same
gradient as one process with the global batch. ``--update_freq`` micro-batches make one optimizer step;
an epoch uses ``len(loader) // update_freq`` whole windows, so no gradient is ever carried into the next
epoch. A step whose loss (on any rank) or gradient is not finite is skipped and counted.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import distributed as D
from .args import TrainConfig
from .generate import generate
from .loss import CaptioningLoss
from .optim import set_lr
from .tokenizer import decode


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(requested: str, device_type: str) -> Precision:
    """``auto``: fp16 on CUDA (the official native path), fp32 on the CPU."""
    name = requested if requested != "auto" else ("fp16" if device_type == "cuda" else "fp32")
    if name == "fp16" and device_type != "cuda":
        raise SystemExit("error: --precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if name == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: this GPU does not support bf16; use --precision fp16 or fp32")
    return Precision(name, device_type)


@dataclass
class StepResult:
    grad_norm: float | None  # None: not computed (DeepSpeed without clipping)
    loss_scale: float | None
    applied: bool
    nonfinite: bool  # loss or gradient not finite (fp16 overflows that a grad scaler handles do not count)


class NativeStepper:
    """DDP (or a bare model) + torch AdamW, with a GradScaler for fp16."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 clip_grad: float | None) -> None:
        self.model, self.optimizer, self.scaler, self.clip_grad = model, optimizer, scaler, clip_grad
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        if last_micro_step or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, loss_finite: bool) -> StepResult:
        scaled = self.scaler.is_enabled()
        if scaled:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.clip_grad is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad))
        else:
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        # With a grad scaler, overflowing gradients are normal: the scaler skips the step itself.
        grads_ok = math.isfinite(norm)
        if loss_finite and (scaled or grads_ok):
            self.scaler.step(self.optimizer)
        if scaled:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, self.scaler.get_scale() if scaled else None, loss_finite and grads_ok,
                          not loss_finite or (not grads_ok and not scaled))


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    kept: float = 0.0
    correct: float = 0.0
    masked: float = 0.0
    steps: int = 0
    skipped: int = 0
    norms: int = 0
    grad_norm_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    first_step: int = 1  # > 1 when a resumed epoch started mid-way

    def summary(self) -> dict[str, float | None]:
        """Token-weighted means over the epoch's steps (the official log.txt ``train_*`` values)."""
        return {"loss": self.loss_sum / max(self.kept, 1), "acc": self.correct / max(self.masked, 1),
                "lr": self.lr, "grad_norm": self.grad_norm_sum / self.norms if self.norms else None,
                "steps": self.steps, "first_step": self.first_step, "skipped_steps": self.skipped,
                "images_per_s": self.images / max(self.seconds, 1e-9), "seconds": self.seconds}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class TrainLoop:
    """Everything one epoch needs; ``train.py`` builds it once."""

    cfg: TrainConfig
    model: nn.Module  # what forward is called on (DDP wrapper, DeepSpeed engine or the bare model)
    stepper: Any  # NativeStepper or deepspeed_support.DeepSpeedStepper
    optimizer: torch.optim.Optimizer
    loss_fn: CaptioningLoss
    schedule: Any  # per-step learning rates (numpy array)
    steps_per_epoch: int
    device: torch.device
    precision: Precision
    ema: Any = None
    logger: Any = None  # runlog.RunLogger on rank 0, else None
    nonfinite_in_a_row: int = 0

    def _micro_step(self, batch: dict[str, torch.Tensor], global_step: int) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the global [loss_sum, kept, correct, masked]."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        pos = batch["language_masked_pos"].bool()
        with self.precision.autocast():
            logits = self.model(batch["image"], batch["masked_tokens"], batch["padding_mask"],
                                batch["language_masked_pos"])
        parts = self.loss_fn(logits, batch["language_tokens"][pos], global_step)
        stats = torch.stack([parts.loss_sum.detach().double(),
                             torch.tensor(float(parts.kept), dtype=torch.float64, device=self.device),
                             parts.correct.double(),
                             torch.tensor(float(parts.total), dtype=torch.float64, device=self.device)])
        world = D.get_world_size()
        if world > 1:
            dist.all_reduce(stats)
        # Global token mean; DDP averages gradients over ranks, hence the factor world.
        loss = parts.loss_sum * (world / stats[1].clamp(min=1).float())
        if not getattr(self.stepper, "scales_by_accumulation", False):
            loss = loss / self.cfg.update_freq
        self.stepper.backward(loss)
        return stats

    def train_epoch(self, epoch: int, batches: Iterator[dict], start_step: int = 0,
                    on_step: Callable[[int, int], None] | None = None) -> EpochStats:
        """Run optimizer steps ``start_step .. steps_per_epoch - 1`` of ``epoch``.

        ``batches`` must already start at micro-batch ``start_step * update_freq``. ``on_step(epoch,
        steps_done)`` runs after each optimizer step (mid-epoch checkpoints).
        """
        cfg, uf = self.cfg, self.cfg.update_freq
        self.model.train()
        stats = EpochStats(first_step=start_step + 1)
        world = D.get_world_size()
        images_per_step = cfg.batch_size * uf * world
        bar = tqdm(total=self.steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", unit="step",
                   disable=self.logger is None, dynamic_ncols=True, mininterval=1.0)
        t_epoch = t_last = time.perf_counter()
        for step in range(start_step, self.steps_per_epoch):
            global_step = epoch * self.steps_per_epoch + step
            lr = float(self.schedule[global_step])
            set_lr(self.optimizer, lr)
            window = torch.zeros(4, dtype=torch.float64, device=self.device)
            for micro in range(uf):
                batch = next(batches)
                with self.stepper.no_sync(micro == uf - 1):
                    window += self._micro_step(batch, global_step)
            loss_sum, kept, correct, masked = window.tolist()
            loss_finite = math.isfinite(loss_sum)
            result = self.stepper.step(loss_finite)
            if result.applied and self.ema is not None:
                self.ema.update(self._bare_model())
            self._count_nonfinite(result, epoch, step, global_step)
            now = time.perf_counter()
            stats.steps += 1
            stats.skipped += int(not result.applied)
            stats.images += images_per_step
            stats.lr = lr
            if loss_finite:
                stats.loss_sum += loss_sum
                stats.kept += kept
                stats.correct += correct
                stats.masked += masked
            if result.applied and result.grad_norm is not None:
                stats.grad_norm_sum += result.grad_norm
                stats.norms += 1
            if self.logger is not None:
                record = {"epoch": epoch, "step": step + 1, "global_step": global_step + 1,
                          "loss": loss_sum / max(kept, 1), "acc": correct / max(masked, 1), "lr": lr,
                          "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                          "images_per_s": images_per_step / max(now - t_last, 1e-9),
                          "peak_mem_mb": peak_memory_mb(self.device), "skipped": not result.applied}
                self.logger.step(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{record['images_per_s']:.1f}", refresh=False)
                bar.update(1)
            t_last = now
            if on_step is not None:
                on_step(epoch, step + 1)
        bar.close()
        stats.seconds = time.perf_counter() - t_epoch
        return stats

    def _count_nonfinite(self, result: StepResult, epoch: int, step: int, global_step: int) -> None:
        if not result.nonfinite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        what = "skipped" if not result.applied else "applied by the engine"
        D.warn(f"non-finite loss or gradient at epoch {epoch} step {step + 1} (global step {global_step + 1}); "
               f"step {what} ({self.nonfinite_in_a_row} in a row, limit --max_nonfinite_steps "
               f"{self.cfg.max_nonfinite_steps})")
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise TrainingStopped(
                f"stopping: {self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                f"gradient (last at epoch {epoch}, step {step + 1}); the last good checkpoint in "
                f"{self.cfg.output_dir or '(no --output_dir)'} is kept. Lower --lr, set --clip_grad, or "
                "use --precision bf16/fp32.")

    def _bare_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)


@torch.no_grad()
def caption_loader(model: nn.Module, loader, tokenizer, cfg: TrainConfig, device: torch.device,
                   precision: Precision, desc: str) -> list[dict]:
    """Beam-search captions ``[{"image_id", "caption"}]`` for this process's share of ``loader``."""
    model.eval()
    out: list[dict] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not D.is_main_process(), dynamic_ncols=True,
                      mininterval=1.0):
        ids = generate(model, batch["image"].to(device, non_blocking=True), num_beams=cfg.num_beams,
                       max_len=cfg.generation_max_len, length_penalty=cfg.length_penalty,
                       mask_token_id=tokenizer.mask_token_id, amp_dtype=precision.dtype)
        for image_id, seq in zip(batch["image_id"].tolist(), ids):
            out.append({"image_id": int(image_id), "caption": decode(tokenizer, seq)})
    return out


def gather_predictions(local: list[tuple[int, dict]]) -> list[dict] | None:
    """All ranks' ``(dataset index, prediction)`` pairs on rank 0, in dataset order with the first
    prediction of each image_id kept; None on the other ranks."""
    shards = D.all_gather_object(local)
    if not D.is_main_process():
        return None
    seen: set[int] = set()
    merged = []
    for _, p in sorted((pair for shard in shards for pair in shard), key=lambda pair: pair[0]):
        if p["image_id"] not in seen:
            seen.add(p["image_id"])
            merged.append(p)
    return merged
