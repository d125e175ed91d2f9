"""CosmosTransformer3DModel (Cosmos 1.0 / Predict2): one list of blocks, self-attention over the video tokens,
cross-attention to the text, feed-forward, each with adaLN-LoRA modulation.

Tokens are the frame-major (frame, row, column) patches of the (B, C, F, H, W) latent. Per-token arguments: the
rotary table ((cos, sin), each (N, D), no batch axis), the learnable positions `extra_pos_emb` (B, N, C), and, in
video-to-world with per-frame timesteps, the modulation inputs `temb` / `embedded_timestep` (B, N, C) (their
(B, C) form is per sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import CosmosTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, TokenArg


def _cosmos_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    return LatentGrid(
        frames=latent.shape[2] // pt, height=latent.shape[3] // ph, width=latent.shape[4] // pw, patch=(pt, ph, pw)
    )


def _cosmos_resized_kwargs(kwargs: dict[str, Any], grid: LatentGrid) -> dict[str, Any]:
    latent = kwargs["hidden_states"]
    resized: dict[str, Any] = {}
    steps = ((latent.shape[2] // grid.frames), (latent.shape[3] // grid.height), (latent.shape[4] // grid.width))
    mask = kwargs.get("condition_mask")  # (B, 1, F, H, W), concatenated to the latent
    if mask is not None:
        resized["condition_mask"] = mask[:, :, :: steps[0], :: steps[1], :: steps[2]]
    timestep = kwargs.get("timestep")
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 5:  # (B, 1, F, 1, 1) per frame
        resized["timestep"] = timestep[:, :, :: steps[0]]
    if kwargs.get("block_controlnet_hidden_states") is not None:
        raise ValueError("a trial forward on a downsampled latent cannot resize ControlNet residuals")
    return resized


def _cosmos_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    # CosmosTransformerBlock.forward's first normalization (before_proj / extra positions first).
    hidden_states = arguments["hidden_states"]
    if arguments.get("extra_pos_emb") is not None:
        hidden_states = hidden_states + arguments["extra_pos_emb"]
    return block.norm1(hidden_states, arguments["embedded_timestep"], arguments["temb"])[0]


_PER_TOKEN = (
    TokenArg("image_rotary_emb", dim=0, batch="shared"),
    TokenArg("extra_pos_emb", dim=1),
    TokenArg("temb", dim=1, ndim=3),
    TokenArg("embedded_timestep", dim=1, ndim=3),
    TokenArg("controlnet_residual", dim=1, ndim=3),
)

COSMOS = ModelAdapter(
    name="cosmos",
    model_class=CosmosTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatiotemporal",
            attention=("attn1", "attn2"),
            mlp=("ff",),
            token_args=_PER_TOKEN,
        ),
    ),
    latent_layout="BCFHW",
    grid=_cosmos_grid,
    resized_kwargs=_cosmos_resized_kwargs,
    patch=lambda model: tuple(model.config.patch_size),
    modulated_input=_cosmos_modulated_input,
    pipeline_cfg=(
        "separate forwards without cache_context (the model has none): cond, then uncond, at the same timestep; "
        "the engine tells them apart by their order within the step"
    ),
    notes=(
        "Blocks with after_proj (Cosmos-Transfer 2.5 ControlNet) return two tensors and are not supported. A trial "
        "forward takes the condition mask and per-frame timesteps of the strided sub-grid."
    ),
)
