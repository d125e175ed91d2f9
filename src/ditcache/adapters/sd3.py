"""SD3Transformer2DModel: one list of MMDiT joint blocks; the last drops the text stream (returns None).

Image tokens are the row-major patches; no rotary table, so no per-token argument besides the stream.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, adaln_zero_modulated_input


def _sd3_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, H, W)
    p = model.config.patch_size
    return LatentGrid(frames=1, height=latent.shape[-2] // p, width=latent.shape[-1] // p, patch=(1, p, p))


SD3 = ModelAdapter(
    name="sd3",
    model_class=SD3Transformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("ff", "ff_context"),
        ),
    ),
    latent_layout="BCHW",
    grid=_sd3_grid,
    patch=lambda model: (1, model.config.patch_size, model.config.patch_size),
    modulated_input=adaln_zero_modulated_input,
)
