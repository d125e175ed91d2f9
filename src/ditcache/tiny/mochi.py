"""Tiny MochiTransformer3DModel: 3 blocks (the last reads the text only), (B, 4, F, H, W) latents, patch 2,
5 text tokens with a mask."""

import torch
from diffusers import MochiTransformer3DModel

from .base import TinyFamily, register_tiny
from .wan import video_inputs


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    inputs = video_inputs(batch, g, size, frames)
    inputs["encoder_attention_mask"] = torch.ones(batch, 5, dtype=torch.long)
    return inputs


MOCHI = register_tiny(
    TinyFamily(
        name="mochi",
        model_class=MochiTransformer3DModel,
        build=lambda: MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=3,
            pooled_projection_dim=16,
            in_channels=4,
            text_embed_dim=16,
            time_embed_dim=4,
            max_sequence_length=5,
        ),
        inputs=_inputs,
        # MochiPipeline passes t = 1000 * (1 - sigma), which grows during sampling (the adapter says so); -1000 *
        # sigma grows the same way, so hand-written loops (euler_sample, calibration) place steps as it does.
        timestep_scale=-1000.0,
    )
)
