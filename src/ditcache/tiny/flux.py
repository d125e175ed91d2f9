"""Tiny FluxTransformer2DModel: 2 dual-stream + 2 single-stream blocks, packed (B, H*W, 4) latents."""

import torch
from diffusers import FluxTransformer2DModel

from ..adapters.flux import flux_image_ids
from .base import TinyFamily, register_tiny


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, size * size, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "img_ids": flux_image_ids(size, size),
        "txt_ids": torch.zeros(5, 3),
    }


FLUX = register_tiny(
    TinyFamily(
        name="flux",
        model_class=FluxTransformer2DModel,
        build=lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            axes_dims_rope=(2, 2, 4),
        ),
        inputs=_inputs,
        timestep_scale=1.0,  # Flux embeds sigma
    )
)
