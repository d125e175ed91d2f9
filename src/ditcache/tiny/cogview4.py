"""Tiny CogView4Transformer2DModel: 3 dual-stream blocks, (B, 4, H, W) latents, patch 2, SDXL-like sizes."""

import torch
from diffusers import CogView4Transformer2DModel

from .base import TinyFamily, register_tiny
from .pixart import image_text_inputs


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    pixels = torch.tensor([[size * 8, size * 8]] * batch, dtype=torch.float32)
    return {
        **image_text_inputs(batch, g, size, frames),
        "original_size": pixels,
        "target_size": pixels.clone(),
        "crop_coords": torch.zeros(batch, 2),
    }


COGVIEW4 = register_tiny(
    TinyFamily(
        name="cogview4",
        model_class=CogView4Transformer2DModel,
        build=lambda: CogView4Transformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            text_embed_dim=16,
            time_embed_dim=8,
            condition_dim=4,
            pos_embed_max_size=16,
            sample_size=8,
            rope_axes_dim=(16, 16),
        ),
        inputs=_inputs,
    )
)
