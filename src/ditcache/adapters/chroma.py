"""ChromaTransformer2DModel (Chroma, a pruned FLUX.1-schnell): dual-stream blocks, then single-stream blocks.

The dual-stream blocks take the image tokens (row-major, packed like Flux) as `hidden_states` and the text as
`encoder_hidden_states`; the rotary table (S_text + S_image, D) and ChromaPipeline's `attention_mask`
(B, S_text + S_image) start with the text positions. The single-stream blocks carry one stream [text; image],
so token-subset methods apply to the dual-stream blocks only. ChromaPipeline runs CFG as two forwards per
step without a cache context (cond, then uncond): the engine gives the second forward at a timestep its own
branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ChromaTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable, TokenArg, concatenated_stream_list
from .flux import _flux_grid, flux_image_ids

_ROTARY = TokenArg("image_rotary_emb", dim=0, batch="shared", offset_arg="encoder_hidden_states")


def _chroma_resized_kwargs(kwargs: Mapping[str, Any], grid: LatentGrid) -> dict[str, Any]:
    like = kwargs["img_ids"]
    resized: dict[str, Any] = {
        "img_ids": flux_image_ids(grid.height, grid.width).to(device=like.device, dtype=like.dtype)
    }
    mask = kwargs.get("attention_mask")
    if mask is not None:  # [text mask; ones for the image tokens] at the new image size
        text = mask[:, : mask.shape[1] - kwargs["hidden_states"].shape[1]]
        resized["attention_mask"] = torch.cat([text, text.new_ones(text.shape[0], grid.num_tokens)], dim=1)
    return resized


def _chroma_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # The image stream's norm1 as in ChromaTransformerBlock.forward (temb = [image 6; text 6] modulations).
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"][:, :6])[0]


CHROMA = ModelAdapter(
    name="chroma",
    model_class=ChromaTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("ff", "ff_context"),
            token_args=(_ROTARY, TokenArg("attention_mask", dim=1, offset_arg="encoder_hidden_states")),
        ),
        concatenated_stream_list("single_transformer_blocks", mlp=("proj_mlp",)),
    ),
    latent_layout="BNC",
    grid=_flux_grid,
    resized_kwargs=_chroma_resized_kwargs,
    modulated_input=_chroma_modulated_input,
    unbatched_args=("img_ids", "txt_ids"),
    pipeline_cfg="separate: cond then uncond forward per step, no cache context (placed by timestep)",
    position_tables=(PositionTable("pos_embed", by_value=("ids",)),),
)
