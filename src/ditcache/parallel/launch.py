"""Process-group setup shared by the parallel modes (a leaf module: torch and stdlib only).

`torchrun --nproc_per_node N ditcache ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
`init_distributed()` joins that group once per process: NCCL when CUDA is available, gloo otherwise (the CPU
path the tests and CI use).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

__all__ = ["DistributedInfo", "init_distributed", "launched_by_torchrun"]


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: its global rank, the number of processes, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names a process group (torchrun, or the same variables set by hand)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(backend: str | None = None) -> DistributedInfo:
    """Join (or reuse) the default process group described by the torchrun environment.

    Args:
        backend: "gloo" or "nccl"; default NCCL when CUDA is available, gloo otherwise.

    Raises:
        RuntimeError: the process was not started by torchrun (no RANK / WORLD_SIZE / MASTER_ADDR /
            MASTER_PORT) and no process group is initialised.
        ValueError: `backend` is neither "gloo" nor "nccl".
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise RuntimeError(
                "parallel generation needs a process group: start with `torchrun --nproc_per_node N ditcache ...` "
                "(RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set)"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
