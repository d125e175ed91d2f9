"""Moving results between ranks as JSON and tensors, never pickle.

`torch.distributed`'s `*_object` collectives pickle what they send and unpickle what they receive; a process
unpickling bytes from another is the risk this project never takes (weights and profiles are safetensors and
JSON for the same reason). Here a payload travels as UTF-8 JSON in a uint8 tensor, and tensors as float32 /
int64 buffers with their shapes in the JSON. Every collective is an `all_gather`, so every rank issues the
same collectives in the same order whatever it holds (a rank with nothing sends an empty payload).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .launch import DistributedInfo

__all__ = ["all_gather_json", "all_gather_tensors"]


def _all_gather_padded(flat: torch.Tensor, info: DistributedInfo) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ), in rank order, on every rank."""
    length = torch.tensor([flat.numel()], dtype=torch.int64, device=info.device)
    lengths = [torch.zeros_like(length) for _ in range(info.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=flat.dtype, device=info.device)
    padded[: flat.numel()] = flat.to(info.device)
    gathered = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded)
    return [g[: int(n)].cpu() for g, n in zip(gathered, lengths)]


def all_gather_json(payload: Any, info: DistributedInfo) -> list[Any]:
    """Every rank's JSON-serialisable `payload` (NaN / inf allowed), in rank order, on every rank."""
    data = json.dumps(payload, allow_nan=True).encode()
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return [json.loads(bytes(part.tolist()).decode()) for part in _all_gather_padded(flat, info)]


def all_gather_tensors(
    tensors: Sequence[torch.Tensor | None], info: DistributedInfo
) -> list[list[torch.Tensor | None]]:
    """Every rank's list of tensors (the same number on every rank; None where a rank has none), in rank order,
    on every rank, on the CPU. Floating tensors travel as float32, others as int64."""
    metas = all_gather_json([None if t is None else [list(t.shape), str(t.dtype)] for t in tensors], info)
    if len({len(meta) for meta in metas}) != 1:
        raise ValueError(f"ranks sent different numbers of tensors: {[len(meta) for meta in metas]}")
    out: list[list[torch.Tensor | None]] = [[] for _ in range(info.world_size)]
    for i, tensor in enumerate(tensors):
        floating = any(meta[i] is not None and _is_floating(meta[i][1]) for meta in metas)
        wire = torch.float32 if floating else torch.int64
        flat = torch.zeros(0, dtype=wire) if tensor is None else tensor.detach().reshape(-1).to(wire)
        for rank, part in enumerate(_all_gather_padded(flat, info)):
            meta = metas[rank][i]
            out[rank].append(None if meta is None else part.reshape(meta[0]).to(_dtype(meta[1])))
    return out


def _is_floating(name: str) -> bool:
    return _dtype(name).is_floating_point


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype
