"""LTXVideoTransformer3DModel (LTX-Video): one list of blocks, self-attention over the video tokens, then
cross-attention to the text, then the feed-forward.

The latent is packed: (B, N, C) tokens, frame-major (frame, row, column), with the token grid passed as the
`num_frames`, `height`, `width` keywords (the pipeline's latent sizes; patch size 1 in every released model).
The rotary table is computed inside, per sample: (cos, sin), each (B, N, D).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import LTXVideoTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, TokenArg
from .resize import strided_token_index


def _ltx_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    sizes = [kwargs.get(name) for name in ("num_frames", "height", "width")]
    if any(size is None for size in sizes) and kwargs.get("video_coords") is None:
        raise ValueError("LTXVideoTransformer3DModel forward needs num_frames, height and width to know the grid")
    if any(size is None for size in sizes):
        coords = kwargs["video_coords"]  # (B, 3, N): frame, row, column of each token
        sizes = [int(coords[0, axis].max().item()) + 1 for axis in range(3)]
    frames, height, width = (int(size) for size in sizes)
    return LatentGrid(frames=frames, height=height, width=width)  # the grid is in tokens


def _ltx_resized_kwargs(kwargs: dict[str, Any], grid: LatentGrid) -> dict[str, Any]:
    resized: dict[str, Any] = {"num_frames": grid.frames, "height": grid.height, "width": grid.width}
    coords = kwargs.get("video_coords")
    if coords is not None:
        full = _ltx_grid(None, {k: v for k, v in kwargs.items() if k != "video_coords"} | {"video_coords": coords})
        index = strided_token_index((full.frames, full.height, full.width), (grid.frames, grid.height, grid.width))
        resized["video_coords"] = coords.index_select(2, index.to(coords.device))
    timestep = kwargs.get("timestep")
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 2 and timestep.shape[1] > 1:
        raise ValueError(
            "per-token timesteps (LTX image-to-video / condition pipelines) cannot follow a downsampled trial "
            "forward; use a method without trial forwards (static, FORA, TeaCache, MixCache)"
        )
    return resized


def _ltx_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # Same arithmetic as LTXVideoTransformerBlock.forward's first modulation.
    hidden_states, temb = arguments["hidden_states"], arguments["temb"]
    table = block.scale_shift_table[None, None] + temb.reshape(hidden_states.shape[0], temb.shape[1], 6, -1)
    shift, scale = table.unbind(dim=2)[:2]
    return block.norm1(hidden_states) * (1 + scale) + shift


LTX = ModelAdapter(
    name="ltx",
    model_class=LTXVideoTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatiotemporal",
            attention=("attn1", "attn2"),
            mlp=("ff",),
            token_args=(TokenArg("image_rotary_emb", dim=1),),
        ),
    ),
    latent_layout="BNC",
    grid=_ltx_grid,
    resized_kwargs=_ltx_resized_kwargs,
    modulated_input=_ltx_modulated_input,
    pipeline_cfg="batched: one forward on [uncond; cond] per step inside cache_context('cond_uncond')",
    notes=(
        "Image-to-video / condition pipelines pass per-token timesteps (B, N): the per-token modulation is then "
        "(B, N, 6 D) and a token-subset block run fails on its shape (TokenCache, OmniCache hierarchical need "
        "the text-to-video pipeline); trial forwards (PreciseCache) raise for them."
    ),
)
