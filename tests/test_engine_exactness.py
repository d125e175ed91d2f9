"""With caching off, removed, or never skipping, outputs are bit-identical to the untouched model."""

import pytest
import torch

import ditcache
from ditcache.testing import euler_sample


def test_nocache_is_bit_identical(setup):
    name, model, inputs, uncond = setup
    reference = euler_sample(model, name, inputs, 6, uncond)
    handle = ditcache.apply(model, ditcache.NoCacheConfig())
    cached = euler_sample(model, name, inputs, 6, uncond, handle=handle)
    assert torch.equal(cached, reference)
    stats = handle.stats().last
    assert stats.forwards == 12 and stats.reused_forwards == 0
    assert stats.blocks_computed == [float(stats.blocks_total)] * 12
    assert stats.macs_executed == stats.macs_full > 0


@pytest.mark.parametrize("preset", ["static-3", "fora-2"])
def test_remove_restores_exact_model(setup, preset):
    name, model, inputs, uncond = setup
    reference = euler_sample(model, name, inputs, 6, uncond)
    before_dict = set(model.__dict__)  # after a plain run: diffusers' cache_context adds its own registry
    handle = ditcache.apply(model, preset)
    changed = euler_sample(model, name, inputs, 6, uncond, handle=handle)
    assert not torch.equal(changed, reference)  # the policy really reused something
    handle.remove()
    assert set(model.__dict__) == before_dict
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(euler_sample(model, name, inputs, 6, uncond), reference)
    handle.remove()  # idempotent


def test_interval_one_never_reuses_and_is_exact(setup):
    name, model, inputs, uncond = setup
    reference = euler_sample(model, name, inputs, 5, uncond)
    for reuse in ("output", "blocks"):
        handle = ditcache.apply(model, ditcache.StaticIntervalConfig(interval=1, warmup_steps=0, reuse=reuse))
        assert torch.equal(euler_sample(model, name, inputs, 5, uncond, handle=handle), reference)
        assert handle.stats().last.reused_forwards == 0
        handle.remove()


def test_apply_twice_raises_and_leaves_first_working(setup):
    name, model, inputs, uncond = setup
    handle = ditcache.apply(model, "static-2")
    with pytest.raises(RuntimeError, match="already applied"):
        ditcache.apply(model, "none")
    euler_sample(model, name, inputs, 6, uncond, handle=handle)
    assert handle.stats().last.reused_forwards > 0
    handle.remove()
    ditcache.apply(model, "none").remove()  # applicable again after remove


def test_apply_to_pipeline_like_object_uses_its_transformer(setup):
    name, model, inputs, _ = setup

    class Holder:
        transformer = model
        scheduler = None

    handle = ditcache.apply(Holder(), "none")
    assert handle.model is model
    handle.remove()
