"""Tiny configurations of the supported diffusers classes and matching inputs, for tests and examples.

They are real diffusers models with random weights, small enough to run a full sampling loop in
milliseconds on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    LatteTransformer3DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

from .adapters.flux import flux_image_ids
from .calibration.profiles import Profile, model_fingerprint

TINY_MODELS = ("flux", "sd3", "wan", "dit", "latte")
TINY_DIT_CLASSES = 10  # class ids 0..9; 10 is the null class (CFG)
TINY_FAMILIES = {
    FluxTransformer2DModel: "flux",
    SD3Transformer2DModel: "sd3",
    WanTransformer3DModel: "wan",
    DiTTransformer2DModel: "dit",
    LatteTransformer3DModel: "latte",
}


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
    elif name == "dit":
        model = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=3,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=TINY_DIT_CLASSES,
        )
    elif name == "latte":
        model = LatteTransformer3DModel(
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
    if name in ("wan", "latte"):
        return {
            "hidden_states": torch.randn(batch, 4, frames, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        }
    if name == "dit":
        return {
            "hidden_states": torch.randn(batch, 4, size, size, generator=g),
            "class_labels": torch.randint(0, TINY_DIT_CLASSES, (batch,), generator=g),
        }
    raise ValueError(f"name must be one of {TINY_MODELS}, got {name!r}")


def tiny_uncond_inputs(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """The unconditional (CFG) counterpart of `tiny_inputs(...)` without the latent: zero text, or DiT's null
    class."""
    uncond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    if name == "dit":
        uncond["class_labels"] = torch.full_like(inputs["class_labels"], TINY_DIT_CLASSES)
    else:
        uncond["encoder_hidden_states"] = torch.zeros_like(inputs["encoder_hidden_states"])
    return uncond


def timestep_scale(name: str) -> float:
    """Flux takes sigma in [0, 1]; the other families take t in [0, 1000]."""
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


# ---------------------------------------------------------------------------------------------------------
# Tiny calibration profiles: synthetic but valid profiles for the tiny models, so that every calibrated preset
# can run (and reuse) in tests without a calibration run. Keyed by profile method (`PolicyConfig.profile_method`);
# a new calibrated method registers its maker here and the contract suite (tests/test_contract.py) picks it up.


def _num_blocks(model: torch.nn.Module) -> int:
    from .adapters import adapter_for

    return sum(len(getattr(model, spec.attr)) for spec in adapter_for(model).block_lists)


def _synthetic_profile(method: str, model: torch.nn.Module, num_steps: int, data: dict[str, Any]) -> Profile:
    """A profile for `model` marked synthetic (made up for tests, not measured)."""
    return Profile(
        method=method,
        model_name=f"tiny-{type(model).__name__}",
        fingerprint=model_fingerprint(model),
        num_steps=num_steps,
        data={"synthetic": True, **data},
    )


def tiny_mixcache_profile(model: torch.nn.Module, num_steps: int) -> Profile:
    """MixCache: theta / delta1 / delta2 far above any rel-L1 a tiny model produces, so the warm-up ends as
    soon as D_step is measured (the cache-enabled phase starts at step 2) and the interval is the longest
    (N = 4 for "acc", 5 for "eff"). The step granularity has the lowest impact, so it comes first and the
    penalty alternates it with CFG or block reuse (whichever the measured D values favour: with these impacts
    the tiny flux, sd3 and wan models use all three in 6-8 steps). Block impacts exist for the candidate
    positions calibration would use."""
    from .calibration.mixcache import DEFAULT_CANDIDATES, candidate_positions

    positions = candidate_positions(_num_blocks(model), DEFAULT_CANDIDATES)
    return _synthetic_profile(
        "mixcache",
        model,
        num_steps,
        {
            "warmup_steps": 2,
            "theta": 1e3,
            "delta1": 1e3,
            "delta2": 1e3,
            "mu_sigma": {"step": [0.0, 0.0], "cfg": [0.0, 0.0], "block": {str(p): [0.0, 0.0] for p in positions}},
            "impact_step": 0.01,
            "impact_cfg": 1.0,
            "impact_block": {str(p): [0.5] * num_steps for p in positions},
            "block_candidates": list(DEFAULT_CANDIDATES),
        },
    )


def tiny_omnicache_trajectory_profile(model: torch.nn.Module, num_steps: int) -> Profile:
    """OmniCache (trajectory): after 2 warm-up steps, "slow" reuses every other step and "fast" two steps in
    every three (never three in a row); gamma 0.5 wherever a previous step exists."""
    warmup = 2
    later = range(warmup, num_steps)
    schedules = {
        "slow": [s for s in later if (s - warmup) % 2 == 0],
        "fast": [s for s in later if (s - warmup) % 3 != 2],
    }
    return _synthetic_profile(
        "omnicache-trajectory",
        model,
        num_steps,
        {
            "curvature": [None] * num_steps,
            "gamma": [0.0] + [0.5] * (num_steps - 1),
            "schedules": schedules,
            "fractions": {speed: len(steps) / num_steps for speed, steps in schedules.items()},
        },
    )


def tiny_omnicache_layered_profile(model: torch.nn.Module, num_steps: int) -> Profile:
    """OmniCache layered: every block costs 1 MAC of a forward of blocks + 1; the middle blocks have the lowest
    loss, so the 2x / 3x schedules reuse them first (from step 1, at most 4 steps in a row)."""
    from .calibration.omnicache_layered import DEFAULT_INTERVAL, chain_parents, schedules

    blocks = _num_blocks(model)
    middle = (blocks - 1) / 2
    data = {
        "loss": [
            [0.0] + [0.01 * (1 + abs(p - middle)) * (1 + s / num_steps) for s in range(1, num_steps)]
            for p in range(blocks)
        ],
        "block_macs": [1] * blocks,
        "forward_macs": blocks + 1,
        "latency": "macs",
        "interval": DEFAULT_INTERVAL,
        "parents": chain_parents(blocks),
    }
    data["schedules"] = schedules(data, (2.0, 3.0), blocks)
    return _synthetic_profile("omnicache-layered", model, num_steps, data)


def tiny_threshold_profile(method: str) -> Callable[[torch.nn.Module, int], Profile]:
    """TeaCache / PreciseCache: a real calibration (their statistic's scale is what matters) on an Euler + CFG
    loop over `tiny_inputs` of the model's family, not saved."""

    def make(model: torch.nn.Module, num_steps: int) -> Profile:
        from .calibration.api import calibrate

        family = TINY_FAMILIES[type(model)]
        inputs = tiny_inputs(family)
        uncond = tiny_uncond_inputs(family, inputs)

        def run(handle: Any) -> torch.Tensor:
            return euler_sample(model, family, inputs, num_steps, uncond, handle=handle)

        return calibrate(model, method, num_steps=num_steps, run=run, guidance=3.0, save=False)

    return make


def tiny_auto_profile(model: torch.nn.Module, num_steps: int) -> Profile:
    """auto (`ditcache.tune`'s profile): FORA-2 as the winner at the default speedup of `AutoConfig` (2x), as if
    tuned; FORA-2 reuses block residuals on every tiny model."""
    from .policies.auto import AutoConfig
    from .registry import preset

    return _synthetic_profile(
        "auto",
        model,
        num_steps,
        {"speedup": AutoConfig().speedup, "config": preset("fora-2").to_dict(), "spec": "fora-2", "candidates": []},
    )


TINY_PROFILE_MAKERS: dict[str, Callable[[torch.nn.Module, int], Profile]] = {
    "auto": tiny_auto_profile,
    "mixcache": tiny_mixcache_profile,
    "omnicache-trajectory": tiny_omnicache_trajectory_profile,
    "omnicache-layered": tiny_omnicache_layered_profile,
    "teacache": tiny_threshold_profile("teacache"),
    "precisecache": tiny_threshold_profile("precisecache"),
    "tokencache": lambda model, num_steps: _tokencache_tiny_profile(model, num_steps),
}


def _tokencache_tiny_profile(model: torch.nn.Module, num_steps: int) -> Profile:
    """TokenCache: a predictor and LoRA trained for a few iterations on the tiny model (weights saved next to the
    JSON by the profile's `save`)."""
    from .calibration.tokencache import tiny_profile

    return tiny_profile(model, num_steps)


def write_tiny_profiles(
    directory: str | Path, model: torch.nn.Module, step_counts: Iterable[int], methods: Iterable[str] | None = None
) -> list[Path]:
    """Save the tiny profile of every registered method (or of `methods`) for `model` at each step count as
    `<method>-tiny-<fingerprint>-<steps>.json` in `directory`: point $DITCACHE_PROFILE_DIR there and the
    calibrated presets find them."""
    directory = Path(directory)
    fingerprint = model_fingerprint(model)
    paths = []
    for method in methods if methods is not None else TINY_PROFILE_MAKERS:
        maker = TINY_PROFILE_MAKERS[method]
        for steps in step_counts:
            paths.append(maker(model, steps).save(directory / f"{method}-tiny-{fingerprint}-{steps}.json"))
    return paths
