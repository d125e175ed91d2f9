"""Tiny SanaTransformer2DModel: 2 linear-attention blocks with a conv feed-forward, (B, 4, H, W) latents."""

from diffusers import SanaTransformer2DModel

from .base import TinyFamily, register_tiny
from .pixart import image_text_inputs

SANA = register_tiny(
    TinyFamily(
        name="sana",
        model_class=SanaTransformer2DModel,
        build=lambda: SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            patch_size=1,
        ),
        inputs=image_text_inputs,
    )
)
