"""Tiny PixArtTransformer2DModel: 3 adaLN-single blocks with cross-attention, (B, 4, H, W) latents, patch 2."""

import torch
from diffusers import PixArtTransformer2DModel

from .base import TinyFamily, register_tiny


def image_text_inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    """A (B, 4, H, W) latent and 5 text tokens of width 16."""
    return {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
    }


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        **image_text_inputs(batch, g, size, frames),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


PIXART = register_tiny(
    TinyFamily(
        name="pixart",
        model_class=PixArtTransformer2DModel,
        build=lambda: PixArtTransformer2DModel(
            sample_size=8,
            num_layers=3,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=16,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=4,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
        inputs=_inputs,
    )
)
