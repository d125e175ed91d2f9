"""Which methods apply to which models: one declarative check, used by `apply` (a clear error up front) and by
`ditcache models`.

A policy says what it needs from the model's adapter with `Policy.requires` (or, when it depends on the config,
`Policy.requirements(config)`); the default is nothing, so a method applies everywhere unless it says
otherwise. Each requirement is checked against the adapter's declarations here, nowhere else:

| requirement | met when | needed by |
|---|---|---|
| `modulated_input` | the adapter reads the first block's timestep-modulated input | TeaCache |
| `resized_forward` | a forward on a downsampled latent works (not in `unsupported`) | PreciseCache LFCache |
| `submodule_hooks` | some block list names attention / MLP submodules | OmniCache trajectory |
| `token_subsets` | some block list runs on a token subset (`no_token_subsets` empty) | TokenCache, OmniCache hier |
| `batch_rows` | a forward on part of the batch rows works (not in `unsupported`) | MixCache with `batched_cfg` |
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapters import ModelAdapter, adapter_for, adapter_for_class
from .config import PolicyConfig
from .registry import policy_for


def _token_subsets(adapter: ModelAdapter) -> str:
    ruled_out = [f"{spec.attr}: {spec.no_token_subsets}" for spec in adapter.block_lists if spec.no_token_subsets]
    if len(ruled_out) < len(adapter.block_lists):
        return ""
    return "no block list can run on a subset of its tokens (" + "; ".join(ruled_out) + ")"


def _declared(capability: str) -> Callable[[ModelAdapter], str]:
    return lambda adapter: dict(adapter.unsupported).get(capability, "")


REQUIREMENTS: dict[str, Callable[[ModelAdapter], str]] = {
    "modulated_input": lambda a: "" if a.modulated_input is not None else "the adapter has no modulated_input",
    "resized_forward": _declared("resized_forward"),
    "submodule_hooks": lambda a: (
        ""
        if any(spec.attention or spec.mlp for spec in a.block_lists)
        else "the adapter names no attention / MLP submodules"
    ),
    "token_subsets": _token_subsets,
    "batch_rows": _declared("batch_rows"),
}


def requirements(config: PolicyConfig) -> tuple[str, ...]:
    """What the config's policy needs from a model (`Policy.requirements`)."""
    try:
        policy = policy_for(config)
    except TypeError:  # a config that resolves to another one (AutoConfig): checked once resolved
        return ()
    needed = tuple(policy.requirements(config))
    unknown = set(needed) - set(REQUIREMENTS)
    if unknown:
        raise ValueError(f"unknown requirements {sorted(unknown)}; known: {sorted(REQUIREMENTS)}")
    return needed


def unmet(config: PolicyConfig, adapter: ModelAdapter) -> list[str]:
    """`"requirement: reason"` for every requirement of the config that the adapter does not meet ([] = applies)."""
    reasons = ((name, REQUIREMENTS[name](adapter)) for name in requirements(config))
    return [f"{name}: {reason}" for name, reason in reasons if reason]


def _adapter(model: torch.nn.Module | type | ModelAdapter) -> ModelAdapter:
    if isinstance(model, ModelAdapter):
        return model
    return adapter_for_class(model) if isinstance(model, type) else adapter_for(model)


def applies(config: PolicyConfig, model: torch.nn.Module | type | ModelAdapter) -> bool:
    """Whether the config's method applies to a model (instance, class or adapter)."""
    return not unmet(config, _adapter(model))


def profile_method_applies(method: str, model: torch.nn.Module | type | ModelAdapter) -> bool:
    """Whether some preset whose config calibrates `method` (`profile_method`) applies to the model: a profile
    for a method that cannot run on it is never made."""
    from .registry import preset, presets

    configs = [config for config in map(preset, presets()) if type(config).profile_method == method]
    return not configs or any(applies(config, model) for config in configs)


def applicable_presets(model: torch.nn.Module | type | ModelAdapter) -> dict[str, list[str]]:
    """Every preset name -> its unmet requirements on the model ([] = applies)."""
    from .registry import preset, presets

    adapter = _adapter(model)
    return {name: unmet(preset(name), adapter) for name in presets()}


def check_applicable(config: PolicyConfig, adapter: ModelAdapter) -> None:
    """Raise `TypeError` naming the method, the model class and what is missing, when the config cannot apply."""
    missing = unmet(config, adapter)
    if missing:
        raise TypeError(
            f"{type(config).__name__} does not apply to {adapter.model_class.__name__} ({adapter.name} adapter): "
            + "; ".join(missing)
        )


def check_context_parallel(config: PolicyConfig, model: torch.nn.Module) -> None:
    """Raise `TypeError` when the model's tokens are sharded over ranks (a TOKENS decision group) and the config
    cannot run that way. Token-level methods select inside one band per rank (`engine/token_bands.py`); a
    TokenCache predictor is a copy of a block whose attention must reach every rank's tokens, which needs
    diffusers' context parallelism (its parallel config), not only a decision group set by hand."""
    from .engine.decisions import Sharding, context_parallel_config, decision_group

    group = decision_group(model)
    if group is None or group.sharding is not Sharding.TOKENS or "token_subsets" not in requirements(config):
        return
    if getattr(config, "selection", None) == "learned" and context_parallel_config(model) is None:
        raise TypeError(
            f"{type(config).__name__} with selection='learned' under a sequence-parallel decision group needs "
            "diffusers' context parallelism (ditcache.parallel.enable_context_parallel) so that its predictor "
            "attends to every rank's tokens; use selection='norm' or 'random', or --parallel data"
        )
