"""Tiny DiTTransformer2DModel: 3 adaLN-Zero blocks, class-conditional; class id 10 is the null class."""

import torch
from diffusers import DiTTransformer2DModel

from .base import TinyFamily, register_tiny

TINY_DIT_CLASSES = 10  # class ids 0..9; 10 is the null class (CFG)


def _inputs(batch: int, g: torch.Generator, size: int, frames: int) -> dict:
    return {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "class_labels": torch.randint(0, TINY_DIT_CLASSES, (batch,), generator=g),
    }


def _uncond(inputs: dict) -> dict:
    return {"class_labels": torch.full_like(inputs["class_labels"], TINY_DIT_CLASSES)}


def _negative(inputs: dict, g: torch.Generator) -> dict:
    return {"class_labels": (inputs["class_labels"] + 1) % TINY_DIT_CLASSES}  # another class


DIT = register_tiny(
    TinyFamily(
        name="dit",
        model_class=DiTTransformer2DModel,
        build=lambda: DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=3,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=TINY_DIT_CLASSES,
        ),
        inputs=_inputs,
        uncond=_uncond,
        negative=_negative,
    )
)
