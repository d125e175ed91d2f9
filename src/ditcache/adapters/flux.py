"""FluxTransformer2DModel: 19 dual-stream ("joint") blocks, then 38 single-stream blocks (FLUX.1).

Both block kinds take the image tokens (row-major) as `hidden_states` and the text as `encoder_hidden_states`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable, TokenArg, adaln_zero_modulated_input


def _flux_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    # Flux takes packed latents (B, H*W, C); positions come from img_ids (N, 3) = (0, row, col).
    img_ids = kwargs.get("img_ids")
    if img_ids is None:
        raise ValueError("FluxTransformer2DModel forward needs img_ids to know the latent grid")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    height = int(ids[:, 1].max().item()) + 1
    width = int(ids[:, 2].max().item()) + 1
    return LatentGrid(frames=1, height=height, width=width)  # the grid is in tokens


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """(height * width, 3) position ids (0, row, column) of a packed Flux latent, row-major."""
    ids = torch.zeros(height * width, 3)
    ids[:, 1] = torch.arange(height).repeat_interleave(width)
    ids[:, 2] = torch.arange(width).repeat(height)
    return ids


def _flux_resized_kwargs(kwargs: dict[str, Any], grid: LatentGrid) -> dict[str, Any]:
    like = kwargs["img_ids"]
    return {"img_ids": flux_image_ids(grid.height, grid.width).to(device=like.device, dtype=like.dtype)}


# Rotary (cos, sin), each (S_text + S_image, D) with no batch axis, text positions first.
_FLUX_ROTARY = TokenArg("image_rotary_emb", dim=0, batch="shared", offset_arg="encoder_hidden_states")

FLUX = ModelAdapter(
    name="flux",
    model_class=FluxTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("ff", "ff_context"),
            token_args=(_FLUX_ROTARY,),
        ),
        BlockListSpec(
            attr="single_transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("proj_mlp",),
            token_args=(_FLUX_ROTARY,),
        ),
    ),
    latent_layout="BNC",
    grid=_flux_grid,
    resized_kwargs=_flux_resized_kwargs,
    modulated_input=adaln_zero_modulated_input,
    unbatched_args=("img_ids", "txt_ids"),
    position_tables=(PositionTable("pos_embed", by_value=("ids",)),),
)
