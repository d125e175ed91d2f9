"""Lumina2Transformer2DModel (Lumina-Image 2.0): caption and noise refiners, then one list of joint blocks.

The hooked list is `layers`, whose blocks carry one stream [caption; image] per row, the caption length
varying with each row's mask: token-subset methods cannot address the image tokens there. The refiners
(two small lists before it) run uncached. Lumina2Pipeline runs CFG as two forwards per step without a cache
context (cond, then uncond) and passes the timestep as 1 - t / 1000, which grows during sampling
(`timesteps_increase`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import Lumina2Transformer2DModel

from .base import BlockListSpec, ModelAdapter, patch_grid, square_patch


def _lumina2_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # LuminaRMSNormZero as in Lumina2TransformerBlock.forward (modulated blocks).
    return block.norm1(arguments["hidden_states"], arguments["temb"])[0]


LUMINA2 = ModelAdapter(
    name="lumina2",
    model_class=Lumina2Transformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="layers",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="joint",
            attention=("attn",),
            mlp=("feed_forward",),
            no_token_subsets="its blocks carry [caption; image] as one stream, the caption length varying per row",
        ),
    ),
    latent_layout="BCHW",
    grid=patch_grid,
    patch=square_patch,
    modulated_input=_lumina2_modulated_input,
    timesteps_increase=True,
    pipeline_cfg="separate: cond then uncond forward per step, no cache context; timestep 1 - t / 1000 grows",
)
