"""Flux2Transformer2DModel (FLUX.2): dual-stream blocks, then single-stream blocks over [text; image].

As in Flux, the dual-stream blocks take the packed image tokens (row-major) as `hidden_states` and the text as
`encoder_hidden_states`, with one rotary pair (S_text + S_image, D) that starts with the text positions; the
modulations are computed once per forward and passed to every block (`temb_mod_img`, `temb_mod_txt`,
`temb_mod`). Positions are 4-D ids (t, h, w, l). The single-stream blocks carry [text; image] as one stream,
so token-subset methods apply to the dual-stream blocks only. Flux2Pipeline embeds the guidance scale (one
forward per step, no CFG); Flux2KleinPipeline runs CFG as two forwards inside `cache_context`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable, TokenArg, concatenated_stream_list


def flux2_image_ids(height: int, width: int) -> torch.Tensor:
    """(height * width, 4) position ids (t=0, row, column, l=0) of a packed FLUX.2 latent, row-major."""
    ids = torch.zeros(height * width, 4, dtype=torch.long)
    ids[:, 1] = torch.arange(height).repeat_interleave(width)
    ids[:, 2] = torch.arange(width).repeat(height)
    return ids


def _flux2_grid(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> LatentGrid:
    img_ids = kwargs.get("img_ids")
    if img_ids is None:
        raise ValueError("Flux2Transformer2DModel forward needs img_ids to know the latent grid")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    ids = ids[ids[:, 0] == ids[:, 0].min()]  # the generated image (reference images have a later t)
    return LatentGrid(frames=1, height=int(ids[:, 1].max().item()) + 1, width=int(ids[:, 2].max().item()) + 1)


def _flux2_resized_kwargs(kwargs: Mapping[str, Any], grid: LatentGrid) -> dict[str, Any]:
    like = kwargs["img_ids"]
    ids = flux2_image_ids(grid.height, grid.width).to(device=like.device, dtype=like.dtype)
    return {"img_ids": ids.expand(like.shape[0], -1, -1) if like.ndim == 3 else ids}


def _flux2_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # The image stream's first modulation, as in Flux2TransformerBlock.forward.
    shift, scale, _ = Flux2Modulation.split(arguments["temb_mod_img"], 2)[0]
    return (1 + scale) * block.norm1(arguments["hidden_states"]) + shift


FLUX2 = ModelAdapter(
    name="flux2",
    model_class=Flux2Transformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("ff", "ff_context"),
            token_args=(TokenArg("image_rotary_emb", dim=0, batch="shared", offset_arg="encoder_hidden_states"),),
        ),
        concatenated_stream_list("single_transformer_blocks", mlp=()),
    ),
    latent_layout="BNC",
    grid=_flux2_grid,
    resized_kwargs=_flux2_resized_kwargs,
    modulated_input=_flux2_modulated_input,
    unbatched_args=("img_ids", "txt_ids"),
    pipeline_cfg="none: Flux2Pipeline embeds guidance (one forward per step); Klein: cache_context cond / uncond",
    position_tables=(PositionTable("pos_embed", by_value=("ids",)),),
)
