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
    forward_args=("hidden_states", "timestep", "encoder_hidden_states"),
)
