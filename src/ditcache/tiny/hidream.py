"""Tiny HiDreamImageTransformer2DModel: 1 dual-stream + 1 single-stream block (2 routed experts),
(B, 4, H, W) latents, patch 2; T5 and two Llama layers of text, the Llama stack (layers, B, S, D)."""

import torch
from diffusers import HiDreamImageTransformer2DModel

from .base import TinyFamily, register_tiny

TEXTS = ("encoder_hidden_states_t5", "encoder_hidden_states_llama3")


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states_t5": torch.randn(batch, 5, 16, generator=g),
        "encoder_hidden_states_llama3": torch.randn(2, batch, 5, 8, generator=g),
        "pooled_embeds": torch.randn(batch, 16, generator=g),
    }


def _uncond(inputs: dict) -> dict:
    uncond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    return {**uncond, **{name: torch.zeros_like(inputs[name]) for name in TEXTS}}


def _negative(inputs: dict, g: torch.Generator) -> dict:
    return {**_uncond(inputs), **{name: torch.randn(inputs[name].shape, generator=g) for name in TEXTS}}


HIDREAM = register_tiny(
    TinyFamily(
        name="hidream",
        model_class=HiDreamImageTransformer2DModel,
        build=lambda: HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=[16, 8],
            text_emb_dim=16,
            num_routed_experts=2,
            num_activated_experts=1,
            axes_dims_rope=(4, 2, 2),
            max_resolution=(16, 16),
            llama_layers=(0, 1),
        ),
        inputs=_inputs,
        uncond=_uncond,
        negative=_negative,
    )
)
