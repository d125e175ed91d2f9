"""Tiny SkyReelsV2Transformer3DModel: Wan's tiny layout, 3 blocks, (B, 4, F, H, W) latents, patch 1x2x2."""

from diffusers import SkyReelsV2Transformer3DModel

from .base import TinyFamily, register_tiny
from .wan import video_inputs

SKYREELS_V2 = register_tiny(
    TinyFamily(
        name="skyreels-v2",
        model_class=SkyReelsV2Transformer3DModel,
        build=lambda: SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=3,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        inputs=video_inputs,
    )
)
