"""`TinyFamily`: a tiny configuration of one diffusers transformer class and inputs shaped like its pipeline's.

One small file per family registers one (`register_tiny`); `ditcache.testing` and the contract suite run
every registered family. Weights are random: these models exist to test caching mechanics, fast, on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

Inputs = dict[str, Any]


def zero_text(inputs: Inputs) -> Inputs:
    """Unconditional inputs: everything but the latent, the text zeroed (a stand-in negative prompt)."""
    uncond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    uncond["encoder_hidden_states"] = torch.zeros_like(inputs["encoder_hidden_states"])
    return uncond


def random_text(inputs: Inputs, generator: torch.Generator) -> Inputs:
    """Another negative prompt: random text of the same shape."""
    uncond = zero_text(inputs)
    text = inputs["encoder_hidden_states"]
    uncond["encoder_hidden_states"] = torch.randn(text.shape, generator=generator, dtype=text.dtype)
    return uncond


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    """`build()` -> the model (eval mode, seeded by the caller); `inputs(batch, generator, size, frames)` -> the
    forward's keyword arguments except `timestep`, the initial latent as `hidden_states`; `uncond(inputs)` the
    unconditional branch's arguments (no latent); `negative(inputs, generator)` another, different negative;
    `timestep_scale`: the timestep the model takes at sigma = 1 (1.0 for Flux's sigma, 1000 for t)."""

    name: str
    model_class: type[torch.nn.Module]
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.Generator, int, int], Inputs]
    uncond: Callable[[Inputs], Inputs] = zero_text
    negative: Callable[[Inputs, torch.Generator], Inputs] = random_text
    timestep_scale: float = 1000.0


_FAMILIES: dict[str, TinyFamily] = {}


def register_tiny(family: TinyFamily) -> TinyFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"tiny family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def tiny_family(name: str) -> TinyFamily:
    if name not in _FAMILIES:
        raise ValueError(f"name must be one of {tuple(_FAMILIES)}, got {name!r}")
    return _FAMILIES[name]


def tiny_families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def family_of(model: torch.nn.Module) -> str:
    """The registered tiny family of a model's class (exact class first, then base classes)."""
    for cls in type(model).__mro__:
        for family in _FAMILIES.values():
            if family.model_class is cls:
                return family.name
    raise ValueError(f"no tiny family for {type(model).__name__}")
