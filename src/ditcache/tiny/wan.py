"""Tiny WanTransformer3DModel: 3 blocks, (B, 4, F, H, W) latents, patch 1x2x2."""

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from .base import TinyFamily, register_tiny


def video_inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    """A (B, 4, F, H, W) latent and 5 text tokens of width 16."""
    return {
        "hidden_states": torch.randn(batch, 4, frames, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
    }


# Wan's tiny layout; SkyReels-V2 (a Wan derivative) builds from the same kwargs.
TINY_WAN_CONFIG = dict(
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
)

WAN = register_tiny(
    TinyFamily(
        name="wan",
        model_class=WanTransformer3DModel,
        build=lambda: WanTransformer3DModel(**TINY_WAN_CONFIG),
        inputs=video_inputs,
    )
)


def tiny_wan_vae() -> AutoencoderKLWan:
    """A tiny Wan VAE (z_dim 4, like the tiny transformer's latents) for pipeline tests; seeded, eval mode."""
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
