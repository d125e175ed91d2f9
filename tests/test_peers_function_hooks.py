"""diffusers' cache hooks on classes without `CacheMixin` (DiT): applied with diffusers' `apply_*` functions,
their per-branch state gets its context from `ditcache.cache_context` (the peers of ref-dit in the bench)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks import apply_first_block_cache

import ditcache
from ditcache.bench.peers import enable_diffusers_cache, taylorseer_identifiers
from ditcache.refmodels import RefPipeline
from ditcache.testing import tiny_inputs, tiny_model, tiny_uncond_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loop(model, inputs, uncond, steps: int = 6) -> torch.Tensor:
    x = inputs["hidden_states"].clone()
    for step, t in enumerate(torch.linspace(999.0, 1.0, steps)):
        outs = []
        for branch, kwargs in (("cond", inputs), ("uncond", uncond)):
            with ditcache.cache_context(model, branch, step_index=step):
                outs.append(model(hidden_states=x, timestep=t.reshape(1), class_labels=kwargs["class_labels"])[0])
        x = x - 0.1 * (outs[1] + 3.0 * (outs[0] - outs[1]))[:, : x.shape[1]]
    return x


def test_cache_context_sets_diffusers_hook_contexts_on_a_class_without_cache_mixin():
    model = tiny_model("dit")
    assert not hasattr(model, "enable_cache")
    inputs = tiny_inputs("dit")
    uncond = tiny_uncond_inputs("dit", inputs)
    plain = _loop(model, inputs, uncond)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=10.0))  # reuse everything it may
    with pytest.raises(ValueError, match="No cache context is set"):
        model(inputs["hidden_states"], timestep=torch.tensor([999.0]), class_labels=inputs["class_labels"])
    cached = _loop(model, inputs, uncond)
    assert not torch.equal(cached, plain)  # steps were reused, each branch from its own state
    registry = model._diffusers_hook
    managers = [
        manager
        for child in (registry, *registry._get_child_registries())
        for hook in child.hooks.values()
        for manager in vars(hook).values()
        if type(manager).__name__ == "StateManager"
    ]
    assert managers and all(manager._context is None for manager in managers)  # cleared after each call


@pytest.mark.parametrize("make", [lambda t: FirstBlockCacheConfig(threshold=0.1), "taylorseer"])
def test_bench_peer_runs_on_ref_dit_and_restores_the_transformer(make):
    pipe = RefPipeline.from_pretrained("ref-dit")
    original = pipe.transformer
    uncached = pipe([1, 2], num_inference_steps=12, seed=0)
    if make == "taylorseer":
        config = TaylorSeerCacheConfig(
            cache_interval=3,
            disable_cache_before_step=3,
            max_order=1,
            taylor_factors_dtype=None,
            cache_identifiers=taylorseer_identifiers(original),
        )
    else:
        config = make(original)
    detach = enable_diffusers_cache(pipe, config)
    assert pipe.transformer is not original  # the hooks go on a copy: nothing in diffusers removes them
    cached = pipe([1, 2], num_inference_steps=12, seed=0)
    detach()
    assert pipe.transformer is original and pipe.model.transformer is original
    assert not getattr(original, "_diffusers_hook", None) or not original._diffusers_hook.hooks
    assert not torch.equal(cached, uncached) and torch.isfinite(cached).all()
    assert torch.equal(pipe([1, 2], num_inference_steps=12, seed=0), uncached)  # the model is untouched
