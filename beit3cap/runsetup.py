"""Setting up a training or evaluation run: device, model, index files, data loaders, samplers, and the
parameters the captioning loss never reaches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from . import distributed as D
from .args import TrainConfig
from .engine import Precision
from .model import BEiT3ForCaptioning, create_model, get_config

TRAIN_INDEX = "coco_captioning.train.jsonl"  # NoCaps trains on COCO too (spec §5.2)


def resolve_device(requested: str | None) -> str:
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise SystemExit("error: --device cuda but CUDA is not available; use --device cpu")
    D.warn("CUDA is not available: running on the CPU (pass --device cpu to silence this)")
    return "cpu"


def build_model(cfg: TrainConfig) -> BEiT3ForCaptioning:
    try:
        model_cfg = get_config(cfg.model)
    except ValueError as e:
        raise SystemExit(f"error: --model: {e}") from None
    if cfg.input_size != model_cfg.img_size:
        raise SystemExit(f"error: --input_size {cfg.input_size} does not match {cfg.model}, which takes "
                         f"{model_cfg.img_size}x{model_cfg.img_size} images; set --input_size {model_cfg.img_size} "
                         "or choose the model of that size")
    model = create_model(cfg.model, drop_path_rate=cfg.drop_path, vocab_size=cfg.vocab_size)
    if cfg.checkpoint_activations:
        model.set_grad_checkpointing(True)
    return model


def index_path(cfg: TrainConfig, name: str) -> Path:
    """Absolute, so that the datasets (which read index files relative to --data_path) do not join a relative
    --data_path twice."""
    return (Path(cfg.data_path) / name).absolute()


def require_index(cfg: TrainConfig, name: str, why: str) -> Path:
    path = index_path(cfg, name)
    if not path.is_file():
        raise SystemExit(f"error: {path} not found ({why}). Build the index first, e.g. "
                         f"'beit3cap index coco --data_path {cfg.data_path} --sentencepiece_model ...'")
    return path


def worker_count(cfg: TrainConfig) -> int:
    """--num_workers, capped at this machine's cores per local process (10 workers on 2 cores only thrash)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", D.get_world_size()))
    cap = max(1, (os.cpu_count() or 1) // max(local_world, 1))
    if cfg.num_workers > cap:
        D.print0(f"--num_workers {cfg.num_workers} capped at {cap} (CPU cores per process on this machine)")
        return cap
    return cfg.num_workers


@dataclass(frozen=True)
class RunEnv:
    device: torch.device
    precision: Precision
    pin: bool  # pin_memory for the loaders
    workers: int  # DataLoader workers per process


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, ...: every item exactly once over all ranks, no padding duplicates."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """The indices of ``sampler`` after the first ``skip`` (mid-epoch resume without loading them)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def eval_loader(cfg: TrainConfig, index_file: Path, env: RunEnv) -> DataLoader:
    from .data.dataset import CaptioningEvalDataset, collate
    from .data.transforms import build_transform

    dataset = CaptioningEvalDataset(cfg.data_path, index_file, build_transform(False, cfg.input_size))
    sampler = ShardSampler(len(dataset), D.get_rank(), D.get_world_size())
    return DataLoader(dataset, batch_size=cfg.resolved_eval_batch_size, sampler=sampler, drop_last=False,
                      num_workers=env.workers, pin_memory=env.pin, collate_fn=collate)


def freeze_unused_parameters(model: BEiT3ForCaptioning, cfg: TrainConfig, device: torch.device) -> list[str]:
    """Set requires_grad=False on the parameters the captioning loss never reaches and return their names.

    These are ``vision_embed.mask_token`` and the image-side tail of the last layer (its image queries,
    attention output, FFN and the final image LayerNorm feed nothing the text stream reads). The official
    code leaves them to DDP's ``find_unused_parameters`` (a graph walk every step); their gradient is None
    there too, so AdamW never touches them either way. They stay in the state dict and in the optimizer
    groups. Found with one backward pass on a dummy batch in eval mode (no RNG draws).
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    t = min(cfg.num_max_bpe_tokens, 4)
    image = torch.zeros(1, 3, cfg.input_size, cfg.input_size, device=device)
    ids = torch.full((1, t), 3, dtype=torch.long, device=device)
    logits = model(image, ids, torch.zeros_like(ids), torch.ones_like(ids))
    logits.float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return unused


def short_list(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
