"""LatteTransformer3DModel (Latte): spatial and temporal `BasicTransformerBlock`s, alternating.

The model runs spatial block i, then temporal block i, for i = 0..L-1 (`execution_order="interleaved"`).
A spatial block sees one frame per batch row: hidden_states (B * F, H * W, C), row-major patches, with the
caption repeated per frame. A temporal block sees one patch position per row: (B * H * W, F, C), no text.
So a spatial block's tokens are the positions of a frame and a temporal block's tokens are the frames of a
position; `LatentGrid` describes the whole (F, H, W) patch grid.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import LatteTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, ada_norm_single_modulated_input


def _latte_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    p = model.config.patch_size
    return LatentGrid(frames=latent.shape[2], height=latent.shape[3] // p, width=latent.shape[4] // p, patch=(1, p, p))


LATTE = ModelAdapter(
    name="latte",
    model_class=LatteTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatial",
            attention=("attn1", "attn2"),
            mlp=("ff",),
        ),
        BlockListSpec(
            attr="temporal_transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="temporal",
            attention=("attn1",),
            mlp=("ff",),
        ),
    ),
    latent_layout="BCFHW",
    grid=_latte_grid,
    patch=lambda model: (1, model.config.patch_size, model.config.patch_size),
    modulated_input=ada_norm_single_modulated_input,  # of the first spatial block
    execution_order="interleaved",
    notes="LattePipeline runs CFG batched and sets no cache context: steps are placed from the timestep.",
)
