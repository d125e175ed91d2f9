"""WanTransformer3DModel: one list of full spatio-temporal blocks with cross-attention to text.

Tokens are the flattened (frame, row, column) patches, frame-major.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable, TokenArg


def _wan_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    return LatentGrid(
        frames=latent.shape[2] // pt, height=latent.shape[3] // ph, width=latent.shape[4] // pw, patch=(pt, ph, pw)
    )


def _wan_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # Same arithmetic as WanTransformerBlock.forward's first modulation (Wan 2.1 temb layout).
    hidden_states, temb = arguments["hidden_states"], arguments["temb"]
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
            token_args=(
                # rotary (cos, sin), each (1, S, 1, D), passed positionally as `rotary_emb`
                TokenArg("rotary_emb", dim=1, batch="broadcast"),
                # Wan 2.2 TI2V: per-token modulation (B, S, 6, D); the 3-D (B, 6, D) form is per sample
                TokenArg("temb", dim=1, ndim=4),
            ),
        ),
    ),
    latent_layout="BCFHW",
    grid=_wan_grid,
    patch=lambda model: tuple(model.config.patch_size),
    modulated_input=_wan_modulated_input,
    position_tables=(PositionTable("rope"),),
)
