"""Tiny ChromaTransformer2DModel: 2 dual-stream + 2 single-stream blocks, packed (B, H*W, 4) latents."""

import torch
from diffusers import ChromaTransformer2DModel

from .base import TinyFamily, register_tiny
from .flux import _inputs as flux_inputs


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    """Flux's inputs without the pooled projection (Chroma has none)."""
    inputs = flux_inputs(batch, g, size, frames)
    del inputs["pooled_projections"]
    return inputs


CHROMA = register_tiny(
    TinyFamily(
        name="chroma",
        model_class=ChromaTransformer2DModel,
        build=lambda: ChromaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            axes_dims_rope=(2, 2, 4),
            approximator_num_channels=8,
            approximator_hidden_dim=16,
            approximator_layers=1,
        ),
        inputs=_inputs,
        timestep_scale=1.0,  # ChromaPipeline passes t / 1000
    )
)
