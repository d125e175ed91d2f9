"""Tiny SD3Transformer2DModel: 3 MMDiT blocks, (B, 4, H, W) latents, patch 2."""

import torch
from diffusers import SD3Transformer2DModel

from .base import TinyFamily, register_tiny


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
    }


SD3 = register_tiny(
    TinyFamily(
        name="sd3",
        model_class=SD3Transformer2DModel,
        build=lambda: SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_projection_dim=16,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            out_channels=4,
        ),
        inputs=_inputs,
    )
)
