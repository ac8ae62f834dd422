"""The ``--enable_deepspeed`` path (spec §1.4) on a current DeepSpeed: ZeRO 0-2, fp16 / bf16 / fp32.

DeepSpeed is an optional extra (``pip install -e '.[deepspeed]'``); without it ``--enable_deepspeed``
stops at start with one line saying so. The engine gets our torch AdamW (the official parameter
groups), so no CUDA extension is compiled. Checkpoints are DeepSpeed directories
``<output_dir>/checkpoint-{epoch}/`` (``checkpoint-{epoch}-step{n}/`` mid-epoch, ``checkpoint-best/``)
with the model under ``module`` (read by ``--finetune ... --model_key model|module``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import distributed as D
from .args import TrainConfig
from .engine import Precision, StepResult
from .trainstate import ResumePoint, resume_point_of

INSTALL_HINT = "pip install -e '.[deepspeed]'"


def require() -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        raise SystemExit(f"error: --enable_deepspeed needs DeepSpeed, which is not importable "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install it with: "
                         f"{INSTALL_HINT}") from None


def single_process_env() -> None:
    """DeepSpeed needs a process group even for one process: describe a 1-process group in the
    environment when no launcher did."""
    import os
    import socket

    if "RANK" in os.environ or "SLURM_PROCID" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def make_config(cfg: TrainConfig, world_size: int, precision: Precision) -> dict[str, Any]:
    """The official ``create_ds_config`` settings, with the precision of this run."""
    config: dict[str, Any] = {
        "train_batch_size": cfg.batch_size * cfg.update_freq * world_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.update_freq,
        "steps_per_print": 1000,
    }
    if precision.name == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": cfg.initial_scale_power,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    elif precision.name == "bf16":
        config["bf16"] = {"enabled": True}
    # Current DeepSpeed clips at 1.0 by default (0.4.0 did not): no --clip_grad means no clipping.
    config["gradient_clipping"] = cfg.clip_grad if cfg.clip_grad is not None else 0.0
    if cfg.zero_stage > 0:
        config["zero_optimization"] = {"stage": cfg.zero_stage, "reduce_bucket_size": 5e8}
    return config


class DeepSpeedStepper:
    """The engine's backward/step; it divides the loss by the accumulation steps itself."""

    scales_by_accumulation = True

    def __init__(self, engine: Any, update_freq: int) -> None:
        self.engine, self.update_freq, self._micro = engine, update_freq, 0

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine reduces gradients at the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.update_freq:
            self.engine.step()  # not a boundary: only advances the engine's micro-step counter

    def step(self, loss_finite: bool) -> StepResult:
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()  # None when the engine computed none (fp32, no clipping)
        norm = float(norm) if norm is not None else None
        applied = getattr(self.engine, "skipped_steps", 0) == skipped_before
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        scale = float(scale) if isinstance(scale, (int, float, torch.Tensor)) else None
        fp16 = self.engine.fp16_enabled()
        grads_ok = norm is None or math.isfinite(norm)
        return StepResult(norm, scale, applied and loss_finite, not loss_finite or (not grads_ok and not fp16))


def initialize(cfg: TrainConfig, model: nn.Module, groups: list[dict], precision: Precision):
    """(engine, optimizer, stepper) for ``model`` with the official parameter groups."""
    import deepspeed

    if cfg.deepspeed_config:
        config = json.loads(Path(cfg.deepspeed_config).read_text(encoding="utf-8"))
    else:
        config = make_config(cfg, D.get_world_size(), precision)
    if cfg.output_dir and D.is_main_process():
        from .fileio import atomic_write_json
        atomic_write_json(Path(cfg.output_dir) / "deepspeed_config.json", config, indent=2)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, eps=cfg.opt_eps, betas=tuple(cfg.opt_betas))
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
    if engine.gradient_accumulation_steps() != cfg.update_freq:
        raise SystemExit(f"error: the DeepSpeed config accumulates {engine.gradient_accumulation_steps()} "
                         f"micro-batches but --update_freq is {cfg.update_freq}")
    return engine, ds_optimizer, DeepSpeedStepper(engine, cfg.update_freq)


def save(engine: Any, cfg: TrainConfig, name: str, client_state: dict) -> None:
    """Every rank calls this (DeepSpeed saves collectively); older mid-epoch folders are removed."""
    tag = name.removesuffix(".pth")
    engine.save_checkpoint(cfg.output_dir, tag=tag, client_state=client_state)
    if D.is_main_process() and tag != "checkpoint-best":
        for old in Path(cfg.output_dir).glob("checkpoint-*-step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    D.print0(f"Saved DeepSpeed checkpoint {Path(cfg.output_dir) / tag}")


def resume(engine: Any, cfg: TrainConfig, ema: Any) -> tuple[ResumePoint | None, list | None]:
    """Load --resume (a checkpoint folder) or, with --auto_resume, the newest one in --output_dir."""
    folder = None
    if cfg.resume:
        folder = Path(cfg.resume)
    elif cfg.auto_resume and cfg.output_dir and Path(cfg.output_dir).is_dir():
        points = [p for d in Path(cfg.output_dir).iterdir() if d.is_dir()
                  and (p := resume_point_of(Path(d.name + ".pth"))) is not None]
        if points:
            best = max(points, key=lambda p: (p.epoch, p.step_in_epoch))
            folder = Path(cfg.output_dir) / best.path.stem
    if folder is None:
        return None, None
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if client is None:
        raise SystemExit(f"error: {folder}: not a DeepSpeed checkpoint folder")
    if ema is not None and client.get("model_ema") is not None:
        ema.load_state_dict(client["model_ema"])
    step = int(client.get("step_in_epoch", 0) or 0)
    epoch = int(client["epoch"])
    return ResumePoint(folder, epoch if step else epoch + 1, step), client.get("rng")
