"""Process-group set-up from the launcher's environment (spec §1.2) and the few collectives training needs.

Ranks come from, in order: OpenMPI variables (``--dist_on_itp``), ``RANK``/``WORLD_SIZE`` (torchrun,
``torch.distributed.launch``), SLURM (``SLURM_PROCID``/``SLURM_NTASKS``), else a single process.
Gloo on the CPU, NCCL on CUDA. Every collective here is a no-op without a process group, so single-process
runs never reach a barrier (an official bug).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def discover(dist_on_itp: bool = False, world_size_flag: int = 1) -> tuple[int, int, int, str] | None:
    """(rank, world_size, local_rank, init_url) from the environment, or None for one process."""
    env = os.environ
    if dist_on_itp:
        rank, world, local = (int(env[f"OMPI_COMM_WORLD_{k}"]) for k in ("RANK", "SIZE", "LOCAL_RANK"))
        url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local, url
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), _env_int("LOCAL_RANK", 0), "env://"
    if "SLURM_PROCID" in env:
        # The official code never read the task count; SLURM_NTASKS is the world size.
        world = _env_int("SLURM_NTASKS", world_size_flag)
        return int(env["SLURM_PROCID"]), world, _env_int("SLURM_LOCALID", 0), "env://"
    return None


def init_distributed(device_type: str, dist_url: str = "env://", dist_on_itp: bool = False,
                     world_size_flag: int = 1, timeout_s: float = 7200.0) -> DistInfo:
    """Join the process group the launcher set up (or stay single-process)."""
    found = discover(dist_on_itp, world_size_flag)
    if found is None:
        return DistInfo()
    rank, world, local, url = found
    if dist_url != "env://":
        url = dist_url
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device_type == "cuda":
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=url, world_size=world, rank=rank,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(True, rank, world, local, backend)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def warn(message: str, all_ranks: bool = False) -> None:
    if all_ranks or is_main_process():
        prefix = f"[rank {get_rank()}] " if all_ranks and is_initialized() else ""
        print(f"WARNING: {prefix}{message}", file=sys.stderr, flush=True)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` for one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks in one collective."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
