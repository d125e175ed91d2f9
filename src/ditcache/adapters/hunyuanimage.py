"""HunyuanImageTransformer2DModel (HunyuanImage 2.1): dual-stream blocks, then single-stream blocks, both
taking and returning (hidden_states, encoder_hidden_states).

Image tokens are the row-major patches of a (B, C, H, W) latent; the attention mask spans [image; text] keys
with the text after the image (and the text tokens are reordered per row), which the engine's token subsets
(a text prefix kept whole) cannot express: token-subset methods do not apply. HunyuanImagePipeline runs CFG
through its guider as two forwards inside `cache_context("pred_cond")` / `("pred_uncond")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import HunyuanImageTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable, adaln_zero_modulated_input

_MASK = "its attention mask spans [image; text] keys with the text after the image"


def _hunyuanimage_grid(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]
    ph, pw = model.config.patch_size[-2:]
    return LatentGrid(frames=1, height=latent.shape[-2] // ph, width=latent.shape[-1] // pw, patch=(1, ph, pw))


def _block_list(attr: str) -> BlockListSpec:
    return BlockListSpec(
        attr=attr,
        inputs=("hidden_states", "encoder_hidden_states"),
        outputs=("hidden_states", "encoder_hidden_states"),
        kind="joint",
        attention=("attn",),
        mlp=("ff", "ff_context"),
        no_token_subsets=_MASK,
    )


HUNYUANIMAGE = ModelAdapter(
    name="hunyuanimage",
    model_class=HunyuanImageTransformer2DModel,
    block_lists=(_block_list("transformer_blocks"), _block_list("single_transformer_blocks")),
    latent_layout="BCHW",
    grid=_hunyuanimage_grid,
    patch=lambda model: (1, *model.config.patch_size[-2:]),
    modulated_input=adaln_zero_modulated_input,
    pipeline_cfg="separate: guider forwards inside cache_context('pred_cond') / ('pred_uncond')",
    position_tables=(PositionTable("rope"),),
)
