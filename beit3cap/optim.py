"""Parameter groups, AdamW and the warm-up + cosine learning-rate schedule (spec §8.1-8.3).

Fixes two official bugs: ``--weight_decay 0`` keeps the groups (and their ``lr_scale``) instead of
handing the optimizer bare parameters, and ``--warmup_steps`` works when ``--warmup_epochs`` is 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from .model import layer_id_for_lr_decay


def is_no_decay(name: str, param: torch.Tensor, skip: Iterable[str]) -> bool:
    """1-D tensors, biases and the model's ``no_weight_decay()`` names get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in set(skip)


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                     skip: Iterable[str] | None = None) -> list[dict]:
    """AdamW groups in the official order: one group per (layer id, decay or not).

    Every parameter is included, frozen ones too (they have no gradient, so AdamW skips them); that
    keeps the group sizes equal to the official ones, so official optimizer states load. Each group has
    ``lr_scale`` (``layer_decay ** (L + 1 - layer_id)``, 1.0 without layer decay) and its ``weight_decay``.
    """
    if skip is None:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip = set(skip)
    use_layers = layer_decay < 1.0
    num_layers = model.get_num_layers() if use_layers else 0
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        decay = not is_no_decay(name, param, skip)
        key = "decay" if decay else "no_decay"
        scale = 1.0
        if use_layers:
            layer_id = layer_id_for_lr_decay(name, num_layers)
            key = f"layer_{layer_id}_{key}"
            scale = layer_decay ** (num_layers + 1 - layer_id)
        if key not in groups:
            # Only the official keys: the optimizer state dict then matches official checkpoints.
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                    eps: float = 1e-8, betas: tuple[float, float] | list[float] = (0.9, 0.999),
                    fused: bool | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`parameter_groups` (top-level weight decay 0, per-group values)."""
    groups = parameter_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, eps=eps, betas=tuple(betas), fused=fused)


def warmup_iters(steps_per_epoch: int, warmup_epochs: int, warmup_steps: int = -1) -> int:
    return warmup_steps if warmup_steps > 0 else max(0, warmup_epochs) * steps_per_epoch


def cosine_schedule(base_lr: float, min_lr: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_steps: int = -1) -> np.ndarray:
    """Per-optimizer-step learning rates, ``epochs * steps_per_epoch`` of them.

    Warm-up: ``linspace(0, base_lr, W)`` (both ends included, so it starts at 0), then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * i / n)) / 2`` for i = 0..n-1, n = total - W.
    A warm-up longer than the run is cut to the run.
    """
    total = epochs * steps_per_epoch
    w = min(warmup_iters(steps_per_epoch, warmup_epochs, warmup_steps), total)
    warm = np.linspace(0.0, base_lr, w) if w > 0 else np.zeros(0)
    n = total - w
    i = np.arange(n)
    cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + np.cos(math.pi * i / max(n, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def state_mismatch(optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Why a saved optimizer state does not fit ``optimizer`` (group sizes, tensor shapes), or None.

    ``Optimizer.load_state_dict`` matches parameters by position and only checks group sizes, so a state
    saved for another model layout would load and fail (or silently misapply) at the first step.
    """
    saved = state.get("param_groups", [])
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in saved] != sizes:
        return f"parameter groups of sizes {[len(g['params']) for g in saved]} instead of {sizes}"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved for i in g["params"]]
    for param, pid in zip(params, ids):
        moment = state.get("state", {}).get(pid, {}).get("exp_avg")
        if moment is not None and tuple(moment.shape) != tuple(param.shape):
            return f"a moment of shape {tuple(moment.shape)} for a parameter of shape {tuple(param.shape)}"
    return None
