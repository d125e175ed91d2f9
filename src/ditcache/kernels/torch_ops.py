"""The torch implementation of the token-cache ops: the reference for the Triton kernels and the CPU path."""

from __future__ import annotations

import torch


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def gather_rows_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, _expand(index.to(x.device), x.shape[-1]))


def scatter_rows_tokens(base: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    return base.clone().scatter_(1, _expand(index.to(base.device), base.shape[-1]), fresh.to(base.dtype))


def merge_mean(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    src, dst = src.to(x.device), dst.to(x.device)
    total = x.float().scatter_add(1, _expand(dst, x.shape[-1]), gather_rows_tokens(x, src).float())
    count = torch.ones(x.shape[:2], device=x.device).scatter_add(1, dst, torch.ones(dst.shape, device=x.device))
    return (total / count.unsqueeze(-1)).to(x.dtype)
