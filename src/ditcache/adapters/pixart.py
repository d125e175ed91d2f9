"""PixArtTransformer2DModel (PixArt-alpha / -sigma): one list of adaLN-single `BasicTransformerBlock`s with
cross-attention to the T5 caption.

Image tokens are the row-major patches (`PatchEmbed`); the blocks take the shared adaLN-single embedding as
`timestep` (B, 6 * C), so the token stream is the only per-token argument. PixArtAlphaPipeline and
PixArtSigmaPipeline batch CFG into one forward (uncond rows first) and set no cache context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter


def patch_grid(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> LatentGrid:
    """The token grid of a (B, C, H, W) latent cut into `model.config.patch_size` patches."""
    latent = kwargs["hidden_states"]
    p = model.config.patch_size
    return LatentGrid(frames=1, height=latent.shape[-2] // p, width=latent.shape[-1] // p, patch=(1, p, p))


def square_patch(model: torch.nn.Module) -> tuple[int, int, int]:
    return (1, model.config.patch_size, model.config.patch_size)


def ada_norm_single_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    """The first modulation of an adaLN-single block (`timestep` = the (B, 6 * C) table): PixArt's
    BasicTransformerBlock ("ada_norm_single") and Sana's block use the same arithmetic."""
    hidden_states, timestep = arguments["hidden_states"], arguments["timestep"]
    table = block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)
    shift, scale = table.chunk(6, dim=1)[:2]
    return block.norm1(hidden_states) * (1 + scale) + shift


PIXART = ModelAdapter(
    name="pixart",
    model_class=PixArtTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatial",
            attention=("attn1", "attn2"),
            mlp=("ff",),
        ),
    ),
    latent_layout="BCHW",
    grid=patch_grid,
    patch=square_patch,
    modulated_input=ada_norm_single_modulated_input,
    pipeline_cfg="batched: one forward on [uncond; cond] rows, no cache context",
)
