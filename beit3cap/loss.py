"""The captioning objective (spec §6.2): label-smoothed KL divergence over every vocabulary row, with
the worst tokens dropped after a number of optimizer steps, plus masked-token accuracy.

The loss is returned as a *sum* over the kept tokens and their count, so the training loop can
normalise by the token count of the whole global batch (one process or many give the same gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # fp32 scalar, sum of the kept per-token losses (carries the graph)
    kept: int  # number of kept tokens
    correct: torch.Tensor  # top-1 hits over all masked tokens (a tensor: no device sync)
    total: int  # number of masked tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum / max(self.kept, 1)


def smoothed_kl(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-token ``KL(q || softmax(logits))`` [N] in fp32, where q puts ``1 - smoothing`` on the label
    and ``smoothing / (C - 1)`` on each of the other C - 1 rows (all rows count, special and dead ids too).

    Equal to ``kl_div(log_softmax(logits), q).sum(-1)`` without building the [N, C] target.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    classes = logp.shape[-1]
    gold = logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if smoothing == 0.0:
        return -gold
    off = smoothing / (classes - 1)
    # sum_c q_c log q_c (0 log 0 = 0) minus sum_c q_c log p_c
    entropy_term = (1 - smoothing) * math.log(1 - smoothing) + smoothing * math.log(off)
    cross = -(1 - smoothing) * gold - off * (logp.sum(-1) - gold)
    return cross + entropy_term


class CaptioningLoss:
    """``loss(logits, labels, global_step)`` -> :class:`LossParts`.

    Drop-worst: once ``global_step > drop_worst_after`` (optimizer steps), keep the
    ``int(N * (1 - drop_worst_ratio))`` smallest per-token losses of this process's batch.
    """

    def __init__(self, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.2,
                 drop_worst_after: int = 12000) -> None:
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after

    def drops_worst(self, global_step: int) -> bool:
        return self.drop_worst_ratio > 0 and global_step > self.drop_worst_after

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, global_step: int) -> LossParts:
        per_token = smoothed_kl(logits, labels, self.label_smoothing)
        n = per_token.numel()
        if self.drops_worst(global_step) and n > 0:
            k = max(1, int(n * (1 - self.drop_worst_ratio)))
            per_token = torch.topk(per_token, k, largest=False, sorted=False).values
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels).sum()
        return LossParts(per_token.sum(), per_token.numel(), correct, n)
