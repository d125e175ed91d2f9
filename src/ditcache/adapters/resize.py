"""Helpers for adapters whose trial forward on a downsampled latent (`ModelAdapter.resized_kwargs`) needs
per-token tables the pipeline computed for the full grid (CogVideoX's and Allegro's rotary embeddings, LTX's
video coordinates, Cosmos' condition mask): the downsampled grid takes the entries of a strided sub-grid, the
first token of each pooled cell, so positions keep spanning the same extent as at the full resolution.
"""

from __future__ import annotations

import torch

from .base import LatentGrid


def strided_token_index(full: tuple[int, int, int], small: tuple[int, int, int]) -> torch.Tensor:
    """Token indices (frame-major "fhw" order) of the full (F, H, W) grid's entries at the strided sub-grid
    of size `small`; each small size must divide the full one."""
    for name, a, b in zip(("frames", "height", "width"), full, small):
        if b < 1 or a % b:
            raise ValueError(f"the downsampled grid's {name} ({b}) must divide the full grid's ({a})")
    f, h, w = (torch.arange(0, a, a // b) for a, b in zip(full, small))
    _, height, width = full
    return ((f[:, None, None] * height + h[None, :, None]) * width + w[None, None, :]).flatten()


def token_grid(grid: LatentGrid) -> tuple[int, int, int]:
    """A `resized_kwargs` grid is the downsampled latent's (frames, height, width): its token grid."""
    pt, ph, pw = grid.patch
    return (max(1, -(-grid.frames // pt)), grid.height // ph, grid.width // pw)
