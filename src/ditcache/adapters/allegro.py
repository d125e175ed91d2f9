"""AllegroTransformer3DModel (Allegro): one list of blocks, self-attention over the video tokens, then
cross-attention to the text, then the feed-forward (adaLN-single modulation).

Tokens are the frame-major (frame, row, column) patches of the (B, C, F, H, W) latent. The pipeline passes the
rotary embedding as `((freqs_t, freqs_h, freqs_w), (positions_t, positions_h, positions_w))`: frequency tables
indexed by per-token positions, each position tensor (1, N).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AllegroTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter
from .resize import strided_token_index, token_grid

_NO_TOKEN_SUBSETS = (
    "its rotary argument nests per-token positions inside ((tables), (positions)), which a token subset cannot gather"
)


def _allegro_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    p, pt = model.config.patch_size, model.config.patch_size_t
    return LatentGrid(
        frames=latent.shape[2] // pt, height=latent.shape[3] // p, width=latent.shape[4] // p, patch=(pt, p, p)
    )


def _allegro_resized_kwargs(kwargs: dict[str, Any], grid: LatentGrid) -> dict[str, Any]:
    rotary = kwargs.get("image_rotary_emb")
    if kwargs.get("attention_mask") is not None:
        raise ValueError("a trial forward on a downsampled latent cannot resize Allegro's video attention_mask")
    if rotary is None:
        return {}
    tables, positions = rotary
    latent = kwargs["hidden_states"]
    pt, ph, pw = grid.patch
    full = (latent.shape[2] // pt, latent.shape[3] // ph, latent.shape[4] // pw)
    index = strided_token_index(full, token_grid(grid)).to(positions[0].device)
    return {"image_rotary_emb": (tables, tuple(p.index_select(-1, index) for p in positions))}


def _allegro_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # Same arithmetic as AllegroTransformerBlock.forward's first modulation.
    hidden_states, temb = arguments["hidden_states"], arguments["temb"]
    table = block.scale_shift_table[None] + temb.reshape(hidden_states.shape[0], 6, -1)
    shift, scale = table.chunk(6, dim=1)[:2]
    return block.norm1(hidden_states) * (1 + scale) + shift


ALLEGRO = ModelAdapter(
    name="allegro",
    model_class=AllegroTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatiotemporal",
            attention=("attn1", "attn2"),
            mlp=("ff",),
            no_token_subsets=_NO_TOKEN_SUBSETS,
        ),
    ),
    latent_layout="BCFHW",
    grid=_allegro_grid,
    resized_kwargs=_allegro_resized_kwargs,
    patch=lambda model: (model.config.patch_size_t, model.config.patch_size, model.config.patch_size),
    modulated_input=_allegro_modulated_input,
    pipeline_cfg="batched: one forward on [uncond; cond] per step, no cache_context (steps placed from the timestep)",
    notes=(
        "Token-subset methods (TokenCache, OmniCache hierarchical) raise: " + _NO_TOKEN_SUBSETS + ". A trial "
        "forward takes the rotary positions of the strided sub-grid."
    ),
)
