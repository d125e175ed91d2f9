"""Tiny LTXVideoTransformer3DModel: 3 blocks, packed (B, F*H*W, 4) latents with the grid as keywords, 5 text
tokens with a mask."""

import torch
from diffusers import LTXVideoTransformer3DModel

from .base import TinyFamily, register_tiny


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, frames * size * size, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.long),
        "num_frames": frames,
        "height": size,
        "width": size,
        "rope_interpolation_scale": (8 / 25, 32, 32),  # the pipeline's (temporal / frame rate, spatial, spatial)
    }


LTX = register_tiny(
    TinyFamily(
        name="ltx",
        model_class=LTXVideoTransformer3DModel,
        build=lambda: LTXVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=3,
            caption_channels=16,
        ),
        inputs=_inputs,
    )
)
