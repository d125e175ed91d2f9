"""Tiny HunyuanVideoTransformer3DModel: 2 dual-stream + 1 single-stream blocks, (B, 4, F, H, W) latents, patch
1x2x2, 5 text tokens with a mask and a pooled text vector; no embedded guidance."""

import torch
from diffusers import HunyuanVideoTransformer3DModel

from .base import TinyFamily, register_tiny
from .wan import video_inputs


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    inputs = video_inputs(batch, g, size, frames)
    inputs["encoder_attention_mask"] = torch.ones(batch, 5, dtype=torch.long)
    inputs["pooled_projections"] = torch.randn(batch, 8, generator=g)
    return inputs


HUNYUAN_VIDEO = register_tiny(
    TinyFamily(
        name="hunyuan-video",
        model_class=HunyuanVideoTransformer3DModel,
        build=lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=False,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4),
        ),
        inputs=_inputs,
    )
)
