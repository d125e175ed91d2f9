"""Tiny configurations of the supported diffusers classes and matching inputs, for tests and examples.

They are real diffusers models with random weights, small enough to run a full sampling loop in
milliseconds on a CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

from .adapters.flux import flux_image_ids

TINY_MODELS = ("flux", "sd3", "wan")


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "flux":
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            axes_dims_rope=(2, 2, 4),
        )
    elif name == "sd3":
        model = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_projection_dim=16,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            out_channels=4,
        )
    elif name == "wan":
        model = WanTransformer3DModel(
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
    else:
        raise ValueError(f"name must be one of {TINY_MODELS}, got {name!r}")
    return model.eval()


def tiny_inputs(name: str, batch: int = 1, seed: int = 1, size: int = 8, frames: int = 3) -> dict[str, Any]:
    """Conditioning inputs (everything but the latent and the timestep) and the initial latent."""
    g = torch.Generator().manual_seed(seed)
    if name == "flux":
        ids = flux_image_ids(size, size)
        return {
            "hidden_states": torch.randn(batch, size * size, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "img_ids": ids,
            "txt_ids": torch.zeros(5, 3),
        }
    if name == "sd3":
        return {
            "hidden_states": torch.randn(batch, 4, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
        }
    if name == "wan":
        return {
            "hidden_states": torch.randn(batch, 4, frames, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        }
    raise ValueError(f"name must be one of {TINY_MODELS}, got {name!r}")


def timestep_scale(name: str) -> float:
    """Flux takes sigma in [0, 1]; SD3 and Wan take t in [0, 1000]."""
    return 1.0 if name == "flux" else 1000.0


def _branch_context(model: torch.nn.Module, handle: Any) -> Any:
    if hasattr(type(model), "cache_context"):
        return model.cache_context
    if handle is not None:
        return handle.branch
    return lambda name: contextlib.nullcontext()


@torch.no_grad()
def euler_sample(
    model: torch.nn.Module,
    name: str,
    inputs: dict[str, Any],
    steps: int,
    cfg_inputs: dict[str, Any] | None = None,
    guidance: float = 3.0,
    handle: Any = None,
) -> torch.Tensor:
    """A plain flow-matching Euler loop. With `cfg_inputs`, runs cond and uncond as two forwards inside
    `model.cache_context(...)`, the way diffusers pipelines do (models without it, like SD3, use
    `handle.branch(...)` when a handle is given)."""
    branch = _branch_context(model, handle)
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    scale = timestep_scale(name)
    for i in range(steps):
        t = torch.full((x.shape[0],), float(sigmas[i]) * scale)
        with branch("cond"):
            v = model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
        if cfg_inputs is not None:
            with branch("uncond"):
                u = model(hidden_states=x, timestep=t, return_dict=False, **cfg_inputs)[0]
            v = u + guidance * (v - u)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def tiny_ref_image_spec(num_layers: int = 1, num_single_layers: int = 1) -> Any:
    """`ref-image`'s layout (32x32 RGB, 4x4 packing, class encoder) on a tiny Flux: for training and pipeline
    tests that need the reference glue but not the shipped weights."""
    import dataclasses

    from .refmodels import REF_IMAGE

    transformer = dict(
        REF_IMAGE.transformer,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        axes_dims_rope=(2, 2, 4),
    )
    return dataclasses.replace(REF_IMAGE, transformer=transformer)
