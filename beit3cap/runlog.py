"""Rank-0 run logs: TensorBoard (``--log_dir``), ``log.txt`` (one JSON line per epoch, official) and
``train_steps.jsonl`` (one JSON line per optimizer step, for plots without TensorBoard).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .fileio import atomic_write

STEPS_FILE = "train_steps.jsonl"
EPOCHS_FILE = "log.txt"

_TB_STEP_TAGS = {"loss": "train/loss", "acc": "train/acc", "lr": "opt/lr", "grad_norm": "opt/grad_norm",
                 "loss_scale": "opt/loss_scale", "images_per_s": "perf/images_per_s",
                 "peak_mem_mb": "perf/peak_mem_mb"}


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLogger:
    """Created on rank 0 only. ``resume_global_step`` drops step records a killed run wrote past the
    checkpoint being resumed, so ``train_steps.jsonl`` reads as one uninterrupted run."""

    def __init__(self, output_dir: str | None, log_dir: str | None, resume_global_step: int | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: only when asked for

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=resume_global_step)
        self._steps = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / STEPS_FILE
            if resume_global_step is not None and path.exists():
                self._truncate(path, resume_global_step)
            self._steps = path.open("a", encoding="utf-8")

    @staticmethod
    def _truncate(path: Path, keep_up_to: int) -> None:
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["global_step"] <= keep_up_to:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by the kill
        atomic_write(path, lambda f: f.writelines(kept))

    def step(self, record: dict[str, Any]) -> None:
        if self._steps is not None:
            self._steps.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            self._steps.flush()
        if self.writer is not None:
            gs = record["global_step"]
            for key, tag in _TB_STEP_TAGS.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], gs)

    def epoch(self, record: dict[str, Any], global_step: int) -> None:
        """Append one line to ``log.txt`` and the validation metrics to TensorBoard."""
        if self.output_dir is not None:
            with (self.output_dir / EPOCHS_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key.startswith("val_") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"val/{key[4:]}", value, global_step)
            self.writer.flush()

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        if self.writer is not None:
            self.writer.close()
