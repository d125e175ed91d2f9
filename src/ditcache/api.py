"""`apply(target, config)`: the one entry point that attaches a policy to a diffusers transformer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .adapters import adapter_for
from .applicability import check_applicable, check_context_parallel
from .config import PolicyConfig
from .engine.compiled import compiling_with, unwrap_compiled, whole_model_compiler
from .engine.engine import ENGINE_ATTR, Engine
from .engine.handle import CacheHandle, PipelineCacheHandle
from .registry import parse_policy, policy_for


def _resolve_target(target: Any) -> tuple[torch.nn.Module, Any]:
    """A transformer, or a pipeline holding one as `.transformer` (its scheduler gives the step count)."""
    models, scheduler = _resolve_targets(target)
    return models[0][1], scheduler


# Pipeline attributes that hold a transformer: Wan 2.2 keeps a second one (low noise) as `transformer_2`.
PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")


def _resolve_targets(target: Any) -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    """[(attribute, transformer)] of a pipeline (`transformer`, and `transformer_2` where it has one) and its
    scheduler, or [("transformer", target)] for a bare model."""
    if isinstance(target, torch.nn.Module):
        return [("transformer", target)], None
    models = [(name, getattr(target, name, None)) for name in PIPELINE_TRANSFORMERS]
    models = [(name, model) for name, model in models if isinstance(model, torch.nn.Module)]
    if models:
        return models, getattr(target, "scheduler", None)
    raise TypeError(
        f"target must be a diffusers transformer (torch.nn.Module) or a pipeline with a .transformer; "
        f"got {type(target).__name__}"
    )


def apply(target: Any, config: PolicyConfig | str) -> CacheHandle | PipelineCacheHandle:
    r"""
    Attach the caching policy described by `config` to a diffusers transformer.

    Hooks are set on the model instance only (never on its class) and `handle.remove()` restores it exactly.

    Args:
        target (`torch.nn.Module` or a pipeline):
            A diffusers transformer of a supported class (`ditcache.supported_models()`, or one registered
            with `ditcache.register_adapter`), or a pipeline holding one as `.transformer`; a pipeline's
            `.scheduler` then gives the number of steps of each generation. A pipeline with a second
            transformer (Wan 2.2's `transformer_2`, the low-noise expert) gets both cached, each with its own
            policy, state and statistics.
        config (`PolicyConfig` or `str`):
            A config object (`ditcache.TeaCacheConfig(threshold=0.2)`), a preset name (`"fora-3"`, see
            `ditcache.presets()`), or a preset name with overrides, `"name:key=value:key=value"` (values are
            Python literals, e.g. `"precisecache-base:alpha=0.9:warmup_steps=4"`), parsed by
            `ditcache.parse_policy`.

    Returns:
        `CacheHandle`: `remove()`, `reset()`, `stats()`, `records()`, `policy`, `branch_state(name)`, and
        `generation(num_steps=...)` / `branch(name)` for hand-written sampling loops. For a pipeline with two
        transformers a `PipelineCacheHandle` over both (`handle["transformer_2"]` is one's own handle).

    Raises:
        ValueError: an unknown preset name, a malformed override, or a config value out of range (the
            message names the field and the allowed values).
        TypeError: `config` is neither a config nor a string, its config type has no registered policy,
            `target` is neither a module nor a pipeline with a `.transformer`, the model class is not
            supported (the message lists supported classes and shows how to register an adapter), or the
            policy needs something the model's adapter lacks.
        RuntimeError: ditcache is already applied to this model (call `handle.remove()` first).

    Calibrated policies (MixCache, OmniCache trajectory) load a `profile=` path here, but look up and check
    their profile at the first forward, when the step count is known: a profile made for another model or
    step count raises `ProfileMismatchError` (a `ValueError`) there.

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, "static-2:warmup_steps=1")
        >>> handle.config
        StaticIntervalConfig(interval=2, warmup_steps=1, cooldown_steps=0, reuse='output', forecast='copy', computed=1)
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=4, handle=handle)
        >>> [record.step for record in handle.records() if record.kind == "reused"]
        [2]
        >>> ditcache.apply(model, "none")
        Traceback (most recent call last):
        ...
        RuntimeError: ditcache is already applied to this FluxTransformer2DModel; call handle.remove() first
        >>> handle.remove()
        >>> ditcache.apply(model, "fora-3:interval=0")
        Traceback (most recent call last):
        ...
        ValueError: interval must be in [1, 100], got 0
    """
    if isinstance(config, str):
        config = parse_policy(config)
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"config must be a PolicyConfig or a preset name, got {type(config).__name__}")
    models, scheduler = _resolve_targets(target)
    handles: dict[str, CacheHandle] = {}
    try:
        for name, model in models:
            handles[name] = _apply_one(model, config, scheduler)
    except BaseException:
        for handle in handles.values():  # all or nothing: a failure on transformer_2 unhooks transformer
            handle.remove()
        raise
    if len(handles) == 1:
        return next(iter(handles.values()))
    return PipelineCacheHandle(handles, config)


def _apply_one(model: torch.nn.Module, config: PolicyConfig, scheduler: Any) -> CacheHandle:
    # `torch.compile(model)`: hook the model under the wrapper, whose compiled frame calls into the hooks;
    # what the hooks compute goes through the wrapper's compiler (ditcache.engine.compiled).
    compiler = whole_model_compiler(model)
    model = unwrap_compiled(model)
    adapter = adapter_for(model)
    config = config.resolve(model)  # e.g. "auto:speedup=2" -> the config tuned for this model
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"resolve() must return a PolicyConfig, got {type(config).__name__}")
    check_applicable(config, adapter)  # what the method needs from the model (ditcache.applicability)
    check_context_parallel(config, model)  # what cannot run with its tokens sharded over ranks
    policy = policy_for(config)(config, adapter)
    engine = Engine(model, adapter, policy, scheduler)
    with compiling_with(compiler):
        engine.install()
    return CacheHandle(engine, config)


def cache_context(model: torch.nn.Module, name: str, **hints: Any) -> contextlib.AbstractContextManager:
    """Name the CFG branch ("cond" / "uncond") of the model forwards inside, whichever the model.

    Diffusers' `model.cache_context(name)` where the class has it (Flux, Wan, ...; ditcache reads it too);
    otherwise (DiT, Latte, SD3) ditcache's own branch context when ditcache is applied, else nothing.
    `hints` (`step_index`, `num_inference_steps`) help ditcache place the forward. Hand-written loops that
    run CFG as two forwards use it so that cond and uncond keep separate caches.

    Example:
        >>> import torch, ditcache
        >>> from ditcache.testing import tiny_inputs, tiny_model, tiny_uncond_inputs
        >>> model, inputs = tiny_model("dit"), tiny_inputs("dit")
        >>> handle = ditcache.apply(model, "fora-2")
        >>> for step, t in enumerate((999.0, 500.0)):
        ...     for branch, kwargs in (("cond", inputs), ("uncond", tiny_uncond_inputs("dit", inputs))):
        ...         with ditcache.cache_context(model, branch, step_index=step):
        ...             _ = model(hidden_states=inputs["hidden_states"], timestep=torch.tensor([t]),
        ...                       class_labels=kwargs["class_labels"])
        >>> [(r.step, r.branch) for r in handle.records()]
        [(0, 'cond'), (0, 'uncond'), (1, 'cond'), (1, 'uncond')]
        >>> handle.remove()
    """
    model = unwrap_compiled(model)
    own = getattr(type(model), "cache_context", None)
    if own is not None:
        return model.cache_context(name, **hints) if hints else model.cache_context(name)
    engine = getattr(model, ENGINE_ATTR, None)
    engine = engine if isinstance(engine, Engine) and not engine.removed else None
    if _has_diffusers_cache_hooks(model):
        return _diffusers_hook_context(model, name, hints, engine)
    return engine.branch(name, **hints) if engine is not None else contextlib.nullcontext()


def _has_diffusers_cache_hooks(model: torch.nn.Module) -> bool:
    """diffusers' cache hooks applied with its `diffusers.hooks.apply_*` functions to a class without
    `cache_context` (DiT, Latte): they keep per-branch state and need a context like CacheMixin gives them."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in model.modules())


@contextlib.contextmanager
def _diffusers_hook_context(
    model: torch.nn.Module, name: str, hints: dict[str, Any], engine: Engine | None
) -> Iterator[None]:
    """What diffusers' `CacheMixin.cache_context(name, **hints)` does, for a class without it (and ditcache's
    own branch context too when ditcache is applied)."""
    import dataclasses

    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    fields = {field.name for field in dataclasses.fields(CacheContext)}
    with engine.branch(name, **hints) if engine is not None else contextlib.nullcontext():
        _set_cache_context(model, CacheContext(name, **{k: v for k, v in hints.items() if k in fields}))
        try:
            yield
        finally:
            _set_cache_context(model, None)
