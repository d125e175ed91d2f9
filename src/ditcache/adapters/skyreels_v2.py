"""SkyReelsV2Transformer3DModel (SkyReels-V2): Wan's layout, one list of spatio-temporal blocks with
cross-attention to the text.

Tokens are the flattened (frame, row, column) patches, frame-major. Diffusion forcing (the DF pipelines) gives
every frame its own timestep: the block modulation is then per token, (B, 6, N, D), gathered with the tokens;
with `causal_block_size` the model adds a block-causal (1, 1, N, N) attention mask.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SkyReelsV2Transformer3DModel

from .base import BlockListSpec, ModelAdapter, PositionTable, TokenArg
from .wan import _wan_grid, _wan_modulated_input


def _skyreels_resized_kwargs(kwargs: dict[str, Any], grid: Any) -> dict[str, Any]:
    timestep = kwargs.get("timestep")
    if kwargs.get("enable_diffusion_forcing") or (isinstance(timestep, torch.Tensor) and timestep.ndim == 2):
        raise ValueError(
            "per-frame timesteps (SkyReels-V2 diffusion forcing) cannot follow a downsampled trial forward; use a "
            "method without trial forwards (static, FORA, MixCache)"
        )
    return {}


SKYREELS_V2 = ModelAdapter(
    name="skyreels-v2",
    model_class=SkyReelsV2Transformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states",),
            kind="spatiotemporal",
            attention=("attn1", "attn2"),
            mlp=("ffn",),
            token_args=(
                TokenArg("rotary_emb", dim=1, batch="broadcast"),  # (cos, sin), each (1, N, 1, D)
                TokenArg("temb", dim=2, ndim=4),  # diffusion forcing: (B, 6, N, D); (B, 6, D) is per sample
            ),
        ),
    ),
    latent_layout="BCFHW",
    grid=_wan_grid,
    resized_kwargs=_skyreels_resized_kwargs,
    patch=lambda model: tuple(model.config.patch_size),
    modulated_input=_wan_modulated_input,  # the same modulation (per-frame timesteps raise)
    pipeline_cfg=(
        "separate forwards: cache_context('cond'), then cache_context('uncond') (text-to-video, image-to-video "
        "and the diffusion-forcing pipelines)"
    ),
    notes=(
        "With causal_block_size (num_frame_per_block > 1) the (1, 1, N, N) block-causal mask cannot be cut to a "
        "token subset: token-subset block runs fail on its shape. Diffusion forcing: trial forwards raise; the "
        "pipeline names no step index, so steps are placed from the largest per-frame timestep, which stays at "
        "1000 for several steps with ar_step > 0 (asynchronous): each such step starts a new generation and "
        "nothing is reused (synchronous ar_step = 0 is placed right)."
    ),
    position_tables=(PositionTable("rope"),),
)
