"""WanTransformer3DModel: one list of full spatio-temporal blocks with cross-attention to text."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter


def _wan_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    return LatentGrid(
        frames=latent.shape[2] // pt, height=latent.shape[3] // ph, width=latent.shape[4] // pw, patch=(pt, ph, pw)
    )


def _wan_modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    # Same arithmetic as WanTransformerBlock.forward's first modulation (Wan 2.1 temb layout).
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    temb = kwargs["temb"] if "temb" in kwargs else args[2]
    if temb.ndim != 3:
        raise ValueError("per-token timesteps (Wan 2.2 TI2V) are not supported by modulated-input criteria")
    shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden_states.float()) * (1 + scale) + shift


WAN = ModelAdapter(
    name="wan",
    model_class=WanTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states",),
            kind="spatiotemporal",
            attention=("attn1", "attn2"),
            mlp=("ffn",),
        ),
    ),
    latent_layout="BCFHW",
    grid=_wan_grid,
    patch=lambda model: tuple(model.config.patch_size),
    modulated_input=_wan_modulated_input,
    forward_args=("hidden_states", "timestep", "encoder_hidden_states"),
)
