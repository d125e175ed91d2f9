"""Tiny CogVideoXTransformer3DModel (the 5b layout: rotary positions from the pipeline): 3 blocks,
(B, F, 4, H, W) latents, patch 2."""

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from .base import TinyFamily, register_tiny

HEAD_DIM = 16  # the rotary table splits it 4 + 6 + 6


def cogvideox_rotary(frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's rotary table for a (frames, height, width) token grid (CogVideoXPipeline's
    `_prepare_rotary_positional_embeddings` with the grid as its own base size)."""
    return get_3d_rotary_pos_embed(
        embed_dim=HEAD_DIM, crops_coords=((0, 0), (height, width)), grid_size=(height, width), temporal_size=frames
    )


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, frames, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "image_rotary_emb": cogvideox_rotary(frames, size // 2, size // 2),
    }


COGVIDEOX = register_tiny(
    TinyFamily(
        name="cogvideox",
        model_class=CogVideoXTransformer3DModel,
        build=lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=HEAD_DIM,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=3,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=5,
            use_rotary_positional_embeddings=True,
        ),
        inputs=_inputs,
    )
)
