"""Offloading hooks and caching (issue 18): diffusers' group offloading and model CPU offload (accelerate) wrap
`forward` like ditcache does; in either order of applying and removing, caching still runs (blocks are skipped)
and the output equals the cached output without offloading."""

import pytest
import torch
from diffusers.hooks import HookRegistry

import ditcache
from ditcache.testing import euler_sample, tiny_inputs, tiny_model

STEPS = 6
PRESET = "fora-2"  # block residual reuse: hooks on the model and on every block
CPU = torch.device("cpu")
GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def _group_offload(model: torch.nn.Module) -> None:
    model.enable_group_offload(
        onload_device=CPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1
    )


def _remove_group_offload(model: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in GROUP_OFFLOAD_HOOKS:
        registry.remove_hook(name, recurse=True)


def _apply_with_group_offload(model: torch.nn.Module, order: str) -> ditcache.CacheHandle:
    if order == "ditcache-first":
        handle = ditcache.apply(model, PRESET)
        _group_offload(model)
        return handle
    _group_offload(model)
    return ditcache.apply(model, PRESET)


def _cached_reference() -> tuple[torch.Tensor, list[float]]:
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    handle = ditcache.apply(model, PRESET)
    output = euler_sample(model, "flux", inputs, steps=STEPS, handle=handle)
    blocks = handle.stats().generations[0].blocks_computed
    handle.remove()
    return output, blocks


def _run(model, handle) -> tuple[torch.Tensor, list[float]]:
    output = euler_sample(model, "flux", tiny_inputs("flux"), steps=STEPS, handle=handle)
    return output, handle.stats().generations[-1].blocks_computed


@pytest.mark.parametrize("order", ["ditcache-first", "offload-first"])
def test_group_offloading_in_either_order(order):
    expected, expected_blocks = _cached_reference()
    assert 0.0 in expected_blocks  # the reference reuses blocks at some steps
    model = tiny_model("flux")
    handle = _apply_with_group_offload(model, order)
    output, blocks = _run(model, handle)
    assert blocks == expected_blocks  # caching really ran under the offloading hooks
    torch.testing.assert_close(output, expected, atol=0, rtol=0)

    # Removing offloading keeps caching (diffusers puts back the forward it wrapped: ours sits beneath it).
    _remove_group_offload(model)
    output, blocks = _run(model, handle)
    assert len(handle.stats().generations) == 2 and blocks == expected_blocks
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    handle.remove()
    plain = tiny_model("flux")
    torch.testing.assert_close(
        euler_sample(model, "flux", tiny_inputs("flux"), steps=3),
        euler_sample(plain, "flux", tiny_inputs("flux"), steps=3),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("order", ["ditcache-first", "offload-first"])
def test_removing_ditcache_keeps_group_offloading(order):
    model = tiny_model("flux")
    handle = _apply_with_group_offload(model, order)
    handle.remove()
    # Offloading still wraps the blocks, and the model runs uncached, equal to a plain model.
    assert "group_offloading" in model.transformer_blocks[0]._diffusers_hook.hooks
    uncached = euler_sample(model, "flux", tiny_inputs("flux"), steps=STEPS)
    plain = euler_sample(tiny_model("flux"), "flux", tiny_inputs("flux"), steps=STEPS)
    torch.testing.assert_close(uncached, plain, atol=0, rtol=0)


@pytest.mark.parametrize("order", ["ditcache-first", "offload-first"])
def test_model_cpu_offload_in_a_pipeline(order):
    """`pipe.enable_model_cpu_offload()` (accelerate hooks, removed and re-added after every call by
    `maybe_free_model_hooks`): every generation is cached, equal to the cached pipeline without offload."""
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from tests.test_pipeline_e2e import tiny_flux_pipeline
    from tests.test_production_compile import run_tiny_pipeline

    run = run_tiny_pipeline
    pipe = tiny_flux_pipeline()
    handle = ditcache.apply(pipe, PRESET)
    expected = run(pipe)
    expected_blocks = handle.stats().generations[0].blocks_computed
    handle.remove()
    if order == "ditcache-first":
        handle = ditcache.apply(pipe, PRESET)
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_model_cpu_offload(device="cpu")
        handle = ditcache.apply(pipe, PRESET)
    assert hasattr(pipe.transformer, "_hf_hook")
    for _ in range(2):
        torch.testing.assert_close(run(pipe), expected, atol=0, rtol=0)
    generations = handle.stats().generations
    assert [g.blocks_computed for g in generations] == [expected_blocks, expected_blocks]
    handle.remove()
    assert hasattr(pipe.transformer, "_hf_hook")  # offloading is left in place
