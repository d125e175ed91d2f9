"""`apply(target, config)`: the one entry point that attaches a policy to a diffusers transformer."""

from __future__ import annotations

from typing import Any

import torch

from .adapters import adapter_for
from .config import PolicyConfig
from .engine.engine import Engine
from .engine.handle import CacheHandle
from .registry import parse_policy, policy_for


def _resolve_target(target: Any) -> tuple[torch.nn.Module, Any]:
    """A transformer, or a pipeline holding one as `.transformer` (its scheduler gives the step count)."""
    if isinstance(target, torch.nn.Module):
        return target, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, getattr(target, "scheduler", None)
    raise TypeError(
        f"target must be a diffusers transformer (torch.nn.Module) or a pipeline with a .transformer; "
        f"got {type(target).__name__}"
    )


def apply(target: Any, config: PolicyConfig | str) -> CacheHandle:
    """Attach the policy described by `config` to `target`: a config object, a preset name, or a preset
    name with overrides ("precisecache-base:alpha=0.9").

    Returns a handle with `remove()`, `reset()` and `stats()`. Raises `RuntimeError` if the model already
    has ditcache applied, `TypeError` for an unsupported model (the message lists supported classes and
    shows how to register an adapter).
    """
    if isinstance(config, str):
        config = parse_policy(config)
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"config must be a PolicyConfig or a preset name, got {type(config).__name__}")
    model, scheduler = _resolve_target(target)
    adapter = adapter_for(model)
    policy = policy_for(config)(config, adapter)
    engine = Engine(model, adapter, policy, scheduler)
    engine.install()
    return CacheHandle(engine, config)
