"""What a training run saves to resume exactly: EMA, RNG states, checkpoint names and their discovery.

Checkpoints use the official layout (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``,
``model_ema``) plus ``step_in_epoch`` (0 = the epoch is finished), ``global_step``, ``steps_per_epoch``
and ``rng`` (one state per rank). Everything is plain data or tensors, so files load with
``weights_only=True``.

Names: ``checkpoint-{epoch}.pth`` after a finished epoch (official), ``checkpoint-{epoch}-step{n}.pth``
after n optimizer steps of an unfinished epoch (``--save_ckpt_steps``).
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

_EPOCH_RE = re.compile(r"^checkpoint-(\d+)\.pth$")
_STEP_RE = re.compile(r"^checkpoint-(\d+)-step(\d+)\.pth$")


class ModelEma:
    """Exponential moving average of a model's floating-point state: ``ema = d * ema + (1 - d) * model``."""

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        if device is not None:
            self.module.to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(self.decay).add_(source[name].detach().to(value.device), alpha=1.0 - self.decay)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ RNG

def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of a rank's global RNGs at the start of an epoch, so an epoch never depends on how the
    previous one ran (or whether the process restarted in between)."""
    return int(np.random.SeedSequence([seed, rank, epoch, 0xBE17]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as weights_only-safe data."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------------------- checkpoints

def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    return f"checkpoint-{epoch}.pth" if step_in_epoch == 0 else f"checkpoint-{epoch}-step{step_in_epoch}.pth"


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    epoch: int  # the epoch to (re)start
    step_in_epoch: int  # optimizer steps of that epoch already done


def resume_point_of(path: Path) -> ResumePoint | None:
    """Where training continues from a checkpoint file named by :func:`checkpoint_name`."""
    if m := _EPOCH_RE.match(path.name):
        return ResumePoint(path, int(m.group(1)) + 1, 0)
    if m := _STEP_RE.match(path.name):
        return ResumePoint(path, int(m.group(1)), int(m.group(2)))
    return None


def find_latest_checkpoint(output_dir: str | Path) -> ResumePoint | None:
    """The most advanced checkpoint in ``output_dir`` (``checkpoint-best.pth`` is not a resume point)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    points = [p for f in folder.iterdir() if (p := resume_point_of(f)) is not None]
    return max(points, key=lambda p: (p.epoch, p.step_in_epoch), default=None)


def resume_point_from_payload(path: Path, payload: dict) -> ResumePoint:
    """Resume position stored in a checkpoint (official ones hold only ``epoch``: a finished epoch)."""
    step = int(payload.get("step_in_epoch", 0) or 0)
    epoch = int(payload["epoch"])
    return ResumePoint(path, epoch if step else epoch + 1, step)


def remove_step_checkpoints(output_dir: str | Path, keep: Path | None = None) -> None:
    """Delete mid-epoch checkpoints older than ``keep`` (all of them when ``keep`` is None)."""
    for f in Path(output_dir).glob("checkpoint-*-step*.pth"):
        if _STEP_RE.match(f.name) and (keep is None or f.resolve() != keep.resolve()):
            f.unlink(missing_ok=True)


def best_val_metric(output_dir: str | Path, task: str, before_epoch: int, metric: str = "CIDEr") -> float | None:
    """Best ``metric`` in ``{task}_result_val_e{n}.json`` for n < before_epoch (restores best tracking)."""
    best = None
    for f in Path(output_dir).glob(f"{task}_result_val_e*.json"):
        m = re.fullmatch(rf"{re.escape(task)}_result_val_e(\d+)\.json", f.name)
        if not m or int(m.group(1)) >= before_epoch:
            continue
        try:
            value = json.loads(f.read_text(encoding="utf-8")).get(metric)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and (best is None or value > best):
            best = float(value)
    return best
