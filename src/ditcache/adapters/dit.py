"""DiTTransformer2DModel (Peebles & Xie, class-conditional DiT): one list of adaLN-Zero `BasicTransformerBlock`s.

Image tokens are the row-major patches (`PatchEmbed`); the blocks take the timestep and the class labels per
sample (each block embeds them itself), so the token stream is the only per-token argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DiTTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter


def _dit_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, H, W)
    p = model.config.patch_size
    return LatentGrid(frames=1, height=latent.shape[-2] // p, width=latent.shape[-1] // p, patch=(1, p, p))


def _dit_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # AdaLayerNormZero called as in BasicTransformerBlock.forward (norm_type "ada_norm_zero").
    hidden_states = arguments["hidden_states"]
    return block.norm1(
        hidden_states, arguments["timestep"], arguments["class_labels"], hidden_dtype=hidden_states.dtype
    )[0]


DIT = ModelAdapter(
    name="dit",
    model_class=DiTTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatial",
            attention=("attn1",),
            mlp=("ff",),
        ),
    ),
    latent_layout="BCHW",
    grid=_dit_grid,
    patch=lambda model: (1, model.config.patch_size, model.config.patch_size),
    modulated_input=_dit_modulated_input,
)
