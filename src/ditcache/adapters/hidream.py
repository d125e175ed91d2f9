"""HiDreamImageTransformer2DModel (HiDream-I1): dual-stream blocks, then single-stream blocks, each wrapped
in a `HiDreamBlock`.

Every block gets a different text: the dual-stream block k sees [T5; Llama layer 0; Llama layer k] as
`encoder_hidden_states` (the model keeps only the first part of its text output), a single-stream block
[image; text; Llama layer k] as one stream; the rotary table lists the image tokens before the text. Block,
step and attention / MLP reuse apply (a skipped block adds its cached residual to this step's inputs, text
included); token-subset methods do not. `encoder_hidden_states_llama3` holds its batch on axis 1, so a
forward on part of the batch rows (MixCache with `batched_cfg`) does not apply either. HiDreamImagePipeline
batches CFG into one forward (uncond rows first) and takes `timesteps`, not `timestep`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import HiDreamImageTransformer2DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable

_TEXT_PER_BLOCK = "each block attends to a different text (Llama layer k) and its rotary table puts the image first"


def _hidream_grid(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]
    p = model.config.patch_size
    if latent.ndim == 4:  # (B, C, H, W)
        return LatentGrid(frames=1, height=latent.shape[-2] // p, width=latent.shape[-1] // p, patch=(1, p, p))
    sizes = kwargs.get("img_sizes")  # patched (B, N, p * p * C) with (B, 2) patch-grid sizes
    if sizes is None:
        raise ValueError("HiDreamImageTransformer2DModel with patched hidden_states needs img_sizes")
    return LatentGrid(frames=1, height=int(sizes[0][0]), width=int(sizes[0][1]), patch=(1, p, p))


def _hidream_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # The image stream's first modulation of the wrapped dual-stream block.
    inner = block.block
    shift, scale = inner.adaLN_modulation(arguments["temb"])[:, None].chunk(12, dim=-1)[:2]
    return inner.norm1_i(arguments["hidden_states"]) * (1 + scale) + shift


HIDREAM = ModelAdapter(
    name="hidream",
    model_class=HiDreamImageTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="double_stream_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states", "encoder_hidden_states"),
            kind="joint",
            attention=(),
            mlp=(),
            no_token_subsets=_TEXT_PER_BLOCK,
        ),
        BlockListSpec(
            attr="single_stream_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="joint",
            attention=(),
            mlp=(),
            no_token_subsets=_TEXT_PER_BLOCK,
        ),
    ),
    latent_layout="BCHW",
    grid=_hidream_grid,
    patch=lambda model: (1, model.config.patch_size, model.config.patch_size),
    modulated_input=_hidream_modulated_input,
    timestep_arg="timesteps",
    unsupported=(("batch_rows", "encoder_hidden_states_llama3 holds its batch on axis 1"),),
    pipeline_cfg="batched: one forward on [uncond; cond] rows, no cache context",
    position_tables=(PositionTable("pe_embedder", by_value=("ids",)),),
)
