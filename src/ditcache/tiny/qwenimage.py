"""Tiny QwenImageTransformer2DModel: 3 dual-stream blocks, packed (B, H*W, 16) latents (4 channels x 2x2)."""

import torch
from diffusers import QwenImageTransformer2DModel

from .base import TinyFamily, register_tiny


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, size * size, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "img_shapes": [[(1, size, size)]] * batch,
    }


QWENIMAGE = register_tiny(
    TinyFamily(
        name="qwenimage",
        model_class=QwenImageTransformer2DModel,
        build=lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            axes_dims_rope=(2, 2, 4),
        ),
        inputs=_inputs,
        timestep_scale=1.0,  # QwenImagePipeline passes t / 1000
    )
)
