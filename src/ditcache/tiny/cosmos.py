"""Tiny CosmosTransformer3DModel: 3 blocks with learnable extra positions, (B, 4, F, H, W) latents, patch
1x2x2, 5 text tokens; no padding-mask channel."""

from diffusers import CosmosTransformer3DModel

from .base import TinyFamily, register_tiny
from .wan import video_inputs

COSMOS = register_tiny(
    TinyFamily(
        name="cosmos",
        model_class=CosmosTransformer3DModel,
        build=lambda: CosmosTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=12,
            num_layers=3,
            mlp_ratio=2,
            text_embed_dim=16,
            adaln_lora_dim=4,
            max_size=(4, 32, 32),
            patch_size=(1, 2, 2),
            concat_padding_mask=False,
            extra_pos_embed_type="learnable",
        ),
        inputs=video_inputs,
    )
)
