"""Tiny SkyReelsV2Transformer3DModel: Wan's tiny layout, 3 blocks, (B, 4, F, H, W) latents, patch 1x2x2."""

from diffusers import SkyReelsV2Transformer3DModel

from .base import TinyFamily, register_tiny
from .wan import TINY_WAN_CONFIG, video_inputs

SKYREELS_V2 = register_tiny(
    TinyFamily(
        name="skyreels-v2",
        model_class=SkyReelsV2Transformer3DModel,
        build=lambda: SkyReelsV2Transformer3DModel(**TINY_WAN_CONFIG),
        inputs=video_inputs,
    )
)
