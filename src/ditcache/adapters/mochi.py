"""MochiTransformer3DModel (Mochi 1): one list of asymmetric dual-stream blocks (video and text apart, joint
attention); the last block only reads the text (`context_pre_only`) and hands it on unchanged.

Blocks return `(hidden_states, encoder_hidden_states)`. Tokens are the frame-major (frame, row, column) patches
of the (B, C, F, H, W) latent; the rotary table ((cos, sin), each (N, heads, D / 2), no batch axis) covers the
video tokens only; the text mask (B, L) drops padded text per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import MochiTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, TokenArg


def _mochi_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    p = model.config.patch_size
    return LatentGrid(frames=latent.shape[2], height=latent.shape[3] // p, width=latent.shape[4] // p, patch=(1, p, p))


def _mochi_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # MochiRMSNormZero(hidden, temb) -> (modulated hidden, gate_msa, scale_mlp, gate_mlp)
    return block.norm1(arguments["hidden_states"], arguments["temb"])[0]


MOCHI = ModelAdapter(
    name="mochi",
    model_class=MochiTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states", "encoder_hidden_states"),
            kind="joint",
            attention=("attn1",),
            mlp=("ff", "ff_context"),
            token_args=(TokenArg("image_rotary_emb", dim=0, batch="shared"),),
        ),
    ),
    latent_layout="BCFHW",
    grid=_mochi_grid,
    patch=lambda model: (1, model.config.patch_size, model.config.patch_size),
    modulated_input=_mochi_modulated_input,
    # MochiPipeline passes reversed timesteps (1000 - t): they grow during sampling.
    timesteps_increase=True,
    pipeline_cfg="batched: one forward on [uncond; cond] per step inside cache_context('cond_uncond')",
    notes="The pipeline's timesteps grow (0 -> 1000); a new generation starts when the timestep does not grow.",
)
