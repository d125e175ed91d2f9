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

from .calibration.profiles import Profile, model_fingerprint
from .tiny import family_of, tiny_families, tiny_family

TINY_MODELS = tiny_families()  # every registered tiny family (`ditcache/tiny/`, one file each)


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of a family (`TINY_MODELS`), random weights from `seed`, in eval mode."""
    family = tiny_family(name)
    torch.manual_seed(seed)
    return family.build().eval()


def tiny_inputs(name: str, batch: int = 1, seed: int = 1, size: int = 8, frames: int = 3) -> dict[str, Any]:
    """Conditioning inputs (everything but the latent and the timestep) and the initial latent."""
    return tiny_family(name).inputs(batch, torch.Generator().manual_seed(seed), size, frames)


def tiny_uncond_inputs(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """The unconditional (CFG) counterpart of `tiny_inputs(...)` without the latent: zero text, or DiT's null
    class."""
    return tiny_family(name).uncond(inputs)


def tiny_negative_inputs(name: str, inputs: dict[str, Any], seed: int = 2) -> dict[str, Any]:
    """Another negative than `tiny_uncond_inputs` (random text, or another class), same shapes."""
    return tiny_family(name).negative(inputs, torch.Generator().manual_seed(seed))


def timestep_scale(name: str) -> float:
    """The timestep at sigma = 1: Flux takes sigma in [0, 1]; the other families take t in [0, 1000]."""
    return tiny_family(name).timestep_scale


def timestep_kwargs(model: torch.nn.Module, timestep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The timestep as the model's forward names it (`timestep`; HiDream's `timesteps`)."""
    from .adapters import adapter_for

    return {adapter_for(model).timestep_arg: timestep}


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
            v = model(hidden_states=x, return_dict=False, **timestep_kwargs(model, t), **cond)[0]
        if cfg_inputs is not None:
            with branch("uncond"):
                u = model(hidden_states=x, return_dict=False, **timestep_kwargs(model, t), **cfg_inputs)[0]
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

        family = family_of(model)
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
    from .applicability import profile_method_applies

    directory = Path(directory)
    fingerprint = model_fingerprint(model)
    paths = []
    if methods is None:  # a method that cannot run on the model (TokenCache on Sana) gets no profile
        methods = [method for method in TINY_PROFILE_MAKERS if profile_method_applies(method, model)]
    for method in methods:
        maker = TINY_PROFILE_MAKERS[method]
        for steps in step_counts:
            paths.append(maker(model, steps).save(directory / f"{method}-tiny-{fingerprint}-{steps}.json"))
    return paths
