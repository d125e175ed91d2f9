"""CogVideoXTransformer3DModel: one list of full-attention blocks over [text; video] tokens (expert adaLN).

The latent is (B, F, C, H, W) ("BFCHW"); tokens are the frame-major (frame, row, column) patches. Each block
carries the video and the text stream and returns both, `(hidden_states, encoder_hidden_states)`; its
feed-forward runs on the concatenated [text; video] tokens. The pipeline computes the rotary table
`image_rotary_emb` ((cos, sin), each (N_video, D), no batch axis, video tokens only) and passes it in;
CogVideoX 1.0 (2b) adds sin-cos positions in the patch embedding instead and passes none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, TokenArg
from .resize import strided_token_index, token_grid


def _patch(model: torch.nn.Module) -> tuple[int, int, int]:
    p = model.config.patch_size
    return (model.config.patch_size_t or 1, p, p)


def _cogvideox_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, F, C, H, W)
    pt, ph, pw = _patch(model)
    frames = -(-latent.shape[1] // pt)  # CogVideoX 1.5 pads the frames to a multiple of patch_size_t
    return LatentGrid(frames=frames, height=latent.shape[3] // ph, width=latent.shape[4] // pw, patch=(pt, ph, pw))


def _cogvideox_resized_kwargs(kwargs: dict[str, Any], grid: LatentGrid) -> dict[str, Any]:
    rotary = kwargs.get("image_rotary_emb")
    if rotary is None:
        return {}
    latent = kwargs["hidden_states"]
    pt, ph, pw = grid.patch
    full = (-(-latent.shape[1] // pt), latent.shape[3] // ph, latent.shape[4] // pw)
    index = strided_token_index(full, token_grid(grid)).to(rotary[0].device)
    return {"image_rotary_emb": tuple(table.index_select(0, index) for table in rotary)}


def _cogvideox_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # CogVideoXLayerNormZero(hidden, encoder_hidden, temb) -> (norm_hidden, norm_encoder, gate, encoder_gate)
    return block.norm1(arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"])[0]


COGVIDEOX = ModelAdapter(
    name="cogvideox",
    model_class=CogVideoXTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states", "encoder_hidden_states"),
            kind="joint",
            attention=("attn1",),
            mlp=("ff",),
            token_args=(TokenArg("image_rotary_emb", dim=0, batch="shared"),),
        ),
    ),
    latent_layout="BFCHW",
    grid=_cogvideox_grid,
    resized_kwargs=_cogvideox_resized_kwargs,
    patch=_patch,
    modulated_input=_cogvideox_modulated_input,
    pipeline_cfg=(
        "batched: one forward on [uncond; cond] per step inside cache_context('cond_uncond') (CogVideoX, "
        "CogVideoX image-to-video, video-to-video)"
    ),
    notes=(
        "Latent (B, F, C, H, W). A trial forward on a downsampled latent takes the pipeline's rotary table at "
        "the strided sub-grid. The feed-forward runs on [text; video]; a token subset keeps every text token."
    ),
)
