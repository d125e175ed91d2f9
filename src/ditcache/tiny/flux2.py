"""Tiny Flux2Transformer2DModel: 2 dual-stream + 2 single-stream blocks, packed (B, H*W, 4) latents."""

import torch
from diffusers import Flux2Transformer2DModel

from ..adapters.flux2 import flux2_image_ids
from .base import TinyFamily, register_tiny


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, size * size, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "img_ids": flux2_image_ids(size, size),
        "txt_ids": torch.zeros(5, 4, dtype=torch.long),
    }


FLUX2 = register_tiny(
    TinyFamily(
        name="flux2",
        model_class=Flux2Transformer2DModel,
        build=lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            timestep_guidance_channels=16,
            axes_dims_rope=(2, 2, 2, 2),
            guidance_embeds=False,
        ),
        inputs=_inputs,
        timestep_scale=1.0,  # Flux2 pipelines pass t / 1000
    )
)
