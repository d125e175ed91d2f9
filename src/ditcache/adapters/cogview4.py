"""CogView4Transformer2DModel (CogView4): one list of dual-stream blocks, (B, C, H, W) latents, patch 2.

Blocks take the image tokens (row-major patches) as `hidden_states` and the text as `encoder_hidden_states`;
the rotary pair (cos, sin), each (S_img, D) without a batch axis, covers the image tokens only (the processor
rotates the tokens after the text). CogView4Pipeline runs CFG as two forwards inside `cache_context("cond")` /
`("uncond")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import CogView4Transformer2DModel

from .base import BlockListSpec, ModelAdapter, PositionTable, TokenArg, patch_grid, square_patch


def _cogview4_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # The image stream's first modulation, as in CogView4TransformerBlock.forward.
    return block.norm1(arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"])[0]


COGVIEW4 = ModelAdapter(
    name="cogview4",
    model_class=CogView4Transformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states", "encoder_hidden_states"),
            kind="joint",
            attention=("attn1",),
            mlp=(),  # `ff` runs twice per block (image, then text): its output cannot be reused as one
            token_args=(TokenArg("image_rotary_emb", dim=0, batch="shared"),),
        ),
    ),
    latent_layout="BCHW",
    grid=patch_grid,
    patch=square_patch,
    modulated_input=_cogview4_modulated_input,
    pipeline_cfg="separate: cond and uncond forwards inside cache_context('cond') / ('uncond')",
    position_tables=(PositionTable("rope"),),
)
