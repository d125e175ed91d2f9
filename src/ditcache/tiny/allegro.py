"""Tiny AllegroTransformer3DModel: 3 blocks, (B, 4, F, H, W) latents, patch 2, 5 text tokens (no rotary
positions: the model runs without them, and token-subset methods raise when the pipeline's are given)."""

from diffusers import AllegroTransformer3DModel

from .base import TinyFamily, register_tiny
from .wan import video_inputs

ALLEGRO = register_tiny(
    TinyFamily(
        name="allegro",
        model_class=AllegroTransformer3DModel,
        build=lambda: AllegroTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=3,
            cross_attention_dim=16,
            sample_width=8,
            sample_height=8,
            sample_frames=12,
            caption_channels=16,
        ),
        inputs=video_inputs,
    )
)
