"""torch.distributed: one process per device under ``torchrun`` (NCCL on CUDA, gloo on CPU);
nothing changes without it."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from common.models.loading import pick_device


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every process it starts."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun (``--nproc_per_node 1`` too, so that
    one process runs the same NCCL/gloo set-up as many): NCCL on CUDA, gloo on CPU."""
    rank, world, local = distributed_env()
    device = pick_device(device_name)
    if world == 1 and not launched_by_torchrun():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def process_group_backend() -> str | None:
    """The process group's backend (nccl, gloo), None without one (a checkpoint records it)."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None
