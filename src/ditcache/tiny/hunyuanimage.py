"""Tiny HunyuanImageTransformer2DModel: 1 dual-stream + 1 single-stream block, (B, 4, H, W) latents."""

import torch
from diffusers import HunyuanImageTransformer2DModel

from .base import TinyFamily, register_tiny
from .pixart import image_text_inputs


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {**image_text_inputs(batch, g, size, frames), "encoder_attention_mask": torch.ones(batch, 5)}


HUNYUANIMAGE = register_tiny(
    TinyFamily(
        name="hunyuanimage",
        model_class=HunyuanImageTransformer2DModel,
        build=lambda: HunyuanImageTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=(1, 1),
            text_embed_dim=16,
            rope_axes_dim=(4, 4),
        ),
        inputs=_inputs,
    )
)
