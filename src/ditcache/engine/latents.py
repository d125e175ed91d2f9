"""Latent layout helpers: view any supported latent as (B, C, F, H, W) and back, and downsample it.

Layouts (from the adapter): "BCHW" (SD3), "BCFHW" (Wan), "BFCHW" (CogVideoX: frames before channels), "BNC"
(Flux's packed tokens, whose row/column grid comes from the adapter's `LatentGrid`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters import LatentGrid

LAYOUTS = ("BCHW", "BCFHW", "BFCHW", "BNC")


def to_5d(x: torch.Tensor, layout: str, grid: LatentGrid | None = None) -> torch.Tensor:
    if layout == "BCFHW":
        return x
    if layout == "BCHW":
        return x.unsqueeze(2)
    if layout == "BFCHW":
        return x.transpose(1, 2)
    if layout == "BNC":
        if grid is None:
            raise ValueError("BNC latents need the token grid")
        b, n, c = x.shape
        if n != grid.num_tokens:
            raise ValueError(f"latent has {n} tokens but the grid says {grid.frames}x{grid.height}x{grid.width}")
        return x.view(b, grid.frames, grid.height, grid.width, c).permute(0, 4, 1, 2, 3)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def from_5d(x5: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BCFHW":
        return x5
    if layout == "BCHW":
        return x5.squeeze(2)
    if layout == "BFCHW":
        return x5.transpose(1, 2)
    if layout == "BNC":
        b, c, f, h, w = x5.shape
        return x5.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def downsample(x5: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Average-pool a (B, C, F, H, W) tensor by (t, h, w); each factor must divide its dimension."""
    t, h, w = factors
    _, _, nf, nh, nw = x5.shape
    for name, size, factor in (("frames", nf, t), ("height", nh, h), ("width", nw, w)):
        if size % factor:
            raise ValueError(f"downsample factor {factor} does not divide the latent {name} ({size})")
    if factors == (1, 1, 1):
        return x5
    return F.avg_pool3d(x5, kernel_size=factors, stride=factors)
