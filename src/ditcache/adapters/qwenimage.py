"""QwenImageTransformer2DModel (Qwen-Image): one list of dual-stream MMDiT blocks over packed 2x2 latents.

`hidden_states` is (B, H * W, C), row-major, like Flux; the grid comes from `img_shapes` ([(frames, height,
width), ...] per sample; an edit pipeline appends its reference image after the first entry, whose tokens then
follow the generated ones). The rotary argument is a pair (image table (S_img, D), text table (S_txt, D)),
neither with a batch axis: only its image entry is per token. QwenImagePipeline runs true CFG (a negative
prompt and `true_cfg_scale > 1`) as two forwards inside `cache_context("cond")` / `("uncond")`.
Qwen-Image-Edit-2511 (`zero_cond_t`) stacks a second timestep embedding on the batch axis of `temb`: caching
that is untested here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, TokenArg


def _first_shape(img_shapes: Any) -> tuple[int, int, int]:
    if img_shapes is None:
        raise ValueError("QwenImageTransformer2DModel forward needs img_shapes to know the latent grid")
    shape = img_shapes[0]
    while isinstance(shape, list):  # [[(1, h, w), (1, h', w')], ...]: one list of images per sample
        shape = shape[0]
    return tuple(int(v) for v in shape)


def _qwen_grid(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> LatentGrid:
    frames, height, width = _first_shape(kwargs.get("img_shapes"))
    return LatentGrid(frames=frames, height=height, width=width)  # the grid is in tokens


def _qwen_resized_kwargs(kwargs: Mapping[str, Any], grid: LatentGrid) -> dict[str, Any]:
    batch = kwargs["hidden_states"].shape[0]
    return {"img_shapes": [[(grid.frames, grid.height, grid.width)]] * batch}


def _qwen_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # The image stream's first modulation, as in QwenImageTransformerBlock.forward.
    img_mod1 = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
    return block._modulate(block.img_norm1(arguments["hidden_states"]), img_mod1, arguments.get("modulate_index"))[0]


QWENIMAGE = ModelAdapter(
    name="qwenimage",
    model_class=QwenImageTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("img_mlp", "txt_mlp"),
            token_args=(
                TokenArg("image_rotary_emb", dim=0, batch="shared", element=0),
                # Qwen-Image-Edit-2511 (zero_cond_t): 0 / 1 per image token, which modulation it takes
                TokenArg("modulate_index", dim=1),
            ),
        ),
    ),
    latent_layout="BNC",
    grid=_qwen_grid,
    resized_kwargs=_qwen_resized_kwargs,
    modulated_input=_qwen_modulated_input,
    pipeline_cfg="separate: cond and uncond forwards inside cache_context('cond') / ('uncond') (true_cfg_scale > 1)",
)
