"""Tiny LatteTransformer3DModel: 2 spatial + 2 temporal blocks (interleaved), (B, 4, F, H, W) latents."""

from diffusers import LatteTransformer3DModel

from .base import TinyFamily, register_tiny
from .wan import video_inputs

LATTE = register_tiny(
    TinyFamily(
        name="latte",
        model_class=LatteTransformer3DModel,
        build=lambda: LatteTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            activation_fn="gelu-approximate",
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=16,
            video_length=3,
        ),
        inputs=video_inputs,
    )
)
