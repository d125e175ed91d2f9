"""Tiny AuraFlowTransformer2DModel: 2 joint + 1 single-stream block, (B, 4, H, W) latents, patch 2."""

from diffusers import AuraFlowTransformer2DModel

from .base import TinyFamily, register_tiny
from .pixart import image_text_inputs

AURAFLOW = register_tiny(
    TinyFamily(
        name="auraflow",
        model_class=AuraFlowTransformer2DModel,
        build=lambda: AuraFlowTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=2,
            num_single_dit_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=64,
        ),
        inputs=image_text_inputs,
        timestep_scale=1.0,  # AuraFlowPipeline passes t / 1000
    )
)
