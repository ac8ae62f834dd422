"""What a demo run trains: data sizes and the training recipe, fixed plans and plans fitted to a budget.

The recipe, found by experiment on the 2-core project machine (the numbers are in the README, section "The demo"):
``beit3_mini_patch16_64`` (128-dim, 4 layers, 16 image tokens) trained from scratch with batch 32, AdamW at
lr 5e-4 after a 60-step warm-up, mask probability 0.6, 16 text tokens, no horizontal flip and no random
crop (the captions say where the shapes are and how many there are). Higher or lower learning rates,
wider, narrower or shallower models, 32 px images, batch 64 and heavier masking all learned slower per
second of CPU. The model first learns the wording and the background, then (after 300-800 steps) the
shapes' colour and size, then count, shape and position.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

CAPTIONS_PER_IMAGE = 5
TASK = "coco_captioning"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and training hyper-parameters of one demo run."""

    name: str
    n_train: int  # training images (x5 captions = training rows)
    n_val: int
    n_test: int
    epochs: int
    image_size: int = 64
    model: str = "beit3_mini_patch16_64"
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-6  # end of the cosine decay; = lr for a constant rate after the warm-up
    warmup_steps: int = 60
    mask_prob: float = 0.6
    max_tokens: int = 16  # BOS + 14 pieces + EOS: the longest caption has 13; generation allows 13 words
    spm_pieces: int = 300
    seed: int = 42
    n_examples: int = 24  # test images shown in the report

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train * CAPTIONS_PER_IMAGE // self.batch_size

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def flags(self, data: Path, spm: Path, run: Path, vocab_size: int, evaluate: Path | None = None) -> list[str]:
        """The ``run_beit3_finetuning.py`` flags of the training run (validation scores CIDEr-D only,
        to skip METEOR's start-up each epoch), or of the ``--eval`` run of checkpoint ``evaluate``
        (every metric)."""
        extra = ["--eval_metrics", "CIDEr"] if evaluate is None else ["--eval", "--finetune", str(evaluate)]
        return [
            "--model", self.model, "--input_size", str(self.image_size), "--task", TASK,
            "--batch_size", str(self.batch_size), "--layer_decay", "1.0", "--lr", f"{self.lr:g}",
            "--min_lr", f"{self.min_lr:g}", "--epochs", str(self.epochs), "--warmup_epochs", "0",
            "--warmup_steps", str(self.warmup_steps),
            "--drop_path", "0.0", "--sentencepiece_model", str(spm), "--vocab_size", str(vocab_size),
            "--data_path", str(data), "--output_dir", str(run), "--weight_decay", "0.05",
            "--seed", str(self.seed), "--save_ckpt_freq", str(self.epochs),
            "--num_max_bpe_tokens", str(self.max_tokens), "--captioning_mask_prob", f"{self.mask_prob:g}",
            "--no_hflip", "--train_crop_scale", "1", "1", "--device", "cpu", "--num_workers", "0",
            "--no_auto_resume", *extra,
        ]


# Measured on the 2-core project machine (the README, section The demo).
DEFAULT_PLAN = DemoPlan("default", n_train=2000, n_val=100, n_test=100, epochs=6)
# Too short for a decay to pay off: the learning rate stays at its peak after the warm-up.
QUICK_PLAN = DemoPlan("quick", n_train=1088, n_val=50, n_test=100, epochs=2, min_lr=5e-4, n_examples=12)


def measure_step_seconds(plan: DemoPlan, repeats: int = 5) -> float:
    """Seconds per training step of ``plan``'s model on this machine: forward, backward and AdamW on a
    random batch, plus data loading (about 1.2 ms per sample here, measured with the real loader)."""
    import torch

    from ..model import create_model

    g = torch.Generator().manual_seed(0)
    model = create_model(plan.model, vocab_size=plan.spm_pieces + 2, drop_path_rate=0.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, t, s = plan.batch_size, plan.max_tokens, plan.image_size
    image = torch.randn(b, 3, s, s, generator=g)
    ids = torch.randint(4, plan.spm_pieces, (b, t), generator=g)
    pos = (torch.rand(b, t, generator=g) < plan.mask_prob).long()
    pos[:, 0] = 0
    times = []
    for k in range(repeats + 2):
        start = time.perf_counter()
        logits = model(image, ids, torch.zeros_like(ids), pos)
        torch.nn.functional.cross_entropy(logits, ids[pos.bool()]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= 2:  # the first steps allocate
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] + 0.0012 * b


def plan_for_minutes(minutes: float, step_seconds: float, base: DemoPlan = DEFAULT_PLAN) -> DemoPlan:
    """A plan whose whole run should take about ``minutes`` at ``step_seconds`` per step: the training
    budget is what the fixed costs (start-up, data, evaluation, report, one validation per epoch) leave;
    longer budgets buy more epochs (up to 8), then more images."""
    fixed = 30.0 + 0.002 * (base.n_val + base.n_test)
    per_epoch_fixed = 2.0
    budget = max(minutes * 60.0 - fixed, 10.0)
    epochs = int(min(8, max(2, budget / step_seconds // 320)))
    steps = max(budget - epochs * per_epoch_fixed, 5.0) / step_seconds
    n_train = max(200, int(steps * base.batch_size / (CAPTIONS_PER_IMAGE * epochs)))
    return replace(base, name=f"{minutes:g}-minute", n_train=n_train, epochs=epochs)


def resolve_plan(quick: bool, minutes: float | None) -> DemoPlan:
    """The plan for the command-line choice: --quick, --minutes N (measures the step time) or the default."""
    if quick and minutes is not None:
        raise SystemExit("error: --quick and --minutes exclude each other")
    if quick:
        return QUICK_PLAN
    if minutes is None:
        return DEFAULT_PLAN
    if not math.isfinite(minutes) or minutes < 1:
        raise SystemExit(f"error: --minutes must be at least 1, got {minutes:g}")
    print(f"measuring the training step time for a {minutes:g}-minute budget ...", flush=True)
    seconds = measure_step_seconds(DEFAULT_PLAN)
    plan = plan_for_minutes(minutes, seconds)
    print(f"{seconds:.3f} s per step: {plan.n_train} training images, {plan.epochs} epochs ({plan.steps} steps)",
          flush=True)
    return plan
