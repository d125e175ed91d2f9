"""Tiny Lumina2Transformer2DModel: 1 caption + 1 noise refiner, 2 joint blocks, (B, 4, H, W) latents, patch 2.

Lumina2Pipeline passes the timestep as 1 - t / 1000 (0 = noise, growing during sampling); the tiny family's
timestep is -sigma (`timestep_scale=-1`), which grows the same way, so hand-written loops exercise the
adapter's `timesteps_increase` too."""

import torch
from diffusers import Lumina2Transformer2DModel

from .base import TinyFamily, register_tiny
from .pixart import image_text_inputs


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        **image_text_inputs(batch, g, size, frames),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.bool),
    }


LUMINA2 = register_tiny(
    TinyFamily(
        name="lumina2",
        model_class=Lumina2Transformer2DModel,
        build=lambda: Lumina2Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            hidden_size=16,
            num_layers=2,
            num_refiner_layers=1,
            num_attention_heads=2,
            num_kv_heads=1,
            multiple_of=16,
            axes_dim_rope=(2, 2, 4),
            axes_lens=(32, 32, 32),
            cap_feat_dim=16,
        ),
        inputs=_inputs,
        timestep_scale=-1.0,  # grows from -1 to 0, like the pipeline's 1 - t / 1000
    )
)
