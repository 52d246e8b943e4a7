"""Distributed setup: the only module that reads the launcher's environment.

Works under torchrun (which turns a PyTorchJob pod's MASTER_ADDR/MASTER_PORT/PET_* variables
into per-process RANK/LOCAL_RANK/WORLD_SIZE), under a PyTorchJob pod started without torchrun
(RANK = pod index, WORLD_SIZE = pods, one process per pod), and as a plain single process.
Every helper degrades to rank 0 / world 1 when no process group is initialised.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from pirl.errors import ConfigError, RetryableError


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as the launcher set them; (0, 0, 1) for a plain process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, local, world


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "config.MACHINE.DEVICE=gpu but no CUDA device is visible; use MACHINE.DEVICE=cpu or auto"
        )
    if preference in ("gpu", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(requested: str, device: torch.device) -> str:
    """config.DISTRIBUTED.BACKEND on this device: gloo is honoured everywhere (GPU included);
    nccl needs CUDA, so a CPU device runs gloo (VISSL's presets all name nccl)."""
    if requested == "gloo" or device.type != "cuda":
        return "gloo"
    return "nccl"


def init(
    device_preference: str = "auto", timeout_seconds: int = 1800, backend: str = "nccl"
) -> DistEnv:
    """Initialise the process group if the launcher asked for more than one process.

    `backend` is config.DISTRIBUTED.BACKEND (see `pick_backend`). `timeout_seconds` bounds
    every collective, so a hung or lost peer fails the job (retryable) instead of blocking it
    forever.
    """
    rank, local, world = launch_env()
    device = pick_device(device_preference, local)
    backend = pick_backend(backend, device)
    if world > 1 and not tdist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(
                    f"WORLD_SIZE={world} but {var} is not set: start the trainer with torchrun"
                )
        try:
            tdist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_seconds),
                device_id=device if backend == "nccl" else None,
            )
        except (
            RuntimeError,
            tdist.DistError,
        ) as exc:  # rendezvous failed: the master is not (yet) there
            raise RetryableError(
                f"could not join the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {exc}"
            ) from None
    return DistEnv(rank=rank, local_rank=local, world_size=world, device=device, backend=backend)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) from all ranks along dim 0, in rank order."""
    if get_world_size() == 1:
        return tensor
    out = torch.empty(
        (get_world_size() * tensor.shape[0], *tensor.shape[1:]),
        dtype=tensor.dtype,
        device=tensor.device,
    )
    tdist.all_gather_single(out, tensor.contiguous())
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if get_world_size() > 1:
        tdist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if get_world_size() > 1:
        tdist.barrier()


def cleanup() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
