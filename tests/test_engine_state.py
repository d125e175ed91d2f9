"""Per-branch state, new generations, batch > 1, two models in one process, explicit context API."""

import pytest
import torch

import ditcache
from ditcache.testing import euler_sample, tiny_inputs, tiny_model


def _capture_outputs(model):
    outputs = []
    hook = model.register_forward_hook(lambda mod, args, out: outputs.append(out[0].clone()))
    return outputs, hook


def test_branches_never_read_each_others_cache(setup):
    name, model, inputs, uncond = setup
    config = ditcache.StaticIntervalConfig(interval=2, warmup_steps=1, reuse="output")
    handle = ditcache.apply(model, config)
    outputs, hook = _capture_outputs(model)
    euler_sample(model, name, inputs, 5, uncond, handle=handle)
    hook.remove()
    # Forward order is cond, uncond per step. Steps 0, 1, 3 compute; 2 and 4 reuse.
    cond, unc = outputs[0::2], outputs[1::2]
    assert handle.stats().last.reused == [(2, "cond"), (2, "uncond"), (4, "cond"), (4, "uncond")]
    assert torch.equal(cond[2], cond[1]) and torch.equal(unc[2], unc[1])
    assert torch.equal(cond[4], cond[3]) and torch.equal(unc[4], unc[3])
    assert not torch.equal(cond[2], unc[2])
    handle.remove()


def test_second_generation_with_other_step_count_starts_clean(setup):
    name, model, inputs, uncond = setup
    config = ditcache.StaticIntervalConfig(interval=2, warmup_steps=1, reuse="blocks")
    fresh = ditcache.apply(model, config)
    expected = euler_sample(model, name, inputs, 4, uncond, handle=fresh)
    fresh.remove()

    handle = ditcache.apply(model, config)
    euler_sample(model, name, inputs, 7, uncond, handle=handle)
    second = euler_sample(model, name, inputs, 4, uncond, handle=handle)  # no reset() by the user
    assert torch.equal(second, expected)
    generations = handle.stats().generations
    assert [g.steps for g in generations] == [7, 4]
    blocks = generations[1].blocks_total
    # 4 steps, interval 2 after 1 warm-up: steps 0, 1, 3 compute all blocks, step 2 none (cond and uncond).
    assert generations[1].blocks_computed == [blocks] * 4 + [0.0, 0.0] + [blocks] * 2
    handle.remove()


def test_batch_rows_match_single_sample_runs():
    name = "flux"
    model = tiny_model(name)
    both = tiny_inputs(name, batch=2)
    handle = ditcache.apply(model, "fora-2")
    batched = euler_sample(model, name, both, 6)
    rows = []
    for i in range(2):
        single = {
            k: (v[i : i + 1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
            for k, v in both.items()
        }
        rows.append(euler_sample(model, name, single, 6))
    torch.testing.assert_close(batched, torch.cat(rows), rtol=1e-4, atol=1e-5)
    assert [g.reused_forwards for g in handle.stats().generations] == [0, 0, 0]
    assert handle.stats().generations[0].blocks_computed.count(0.0) == 2
    handle.remove()


def test_two_cached_models_do_not_interfere():
    name = "wan"
    a, b = tiny_model(name, seed=0), tiny_model(name, seed=1)
    inputs = tiny_inputs(name)
    config = ditcache.StaticIntervalConfig(interval=2, warmup_steps=1)
    expected = {}
    for key, model in (("a", a), ("b", b)):
        h = ditcache.apply(model, config)
        expected[key] = euler_sample(model, name, inputs, 5)
        h.remove()
    ha, hb = ditcache.apply(a, config), ditcache.apply(b, config)
    # Interleave the two sampling loops forward by forward.
    xa = xb = inputs["hidden_states"]
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    sigmas = torch.linspace(1, 0, 6)
    with torch.no_grad():
        for i in range(5):
            t = torch.tensor([float(sigmas[i]) * 1000])
            va = a(hidden_states=xa, timestep=t, return_dict=False, **cond)[0]
            vb = b(hidden_states=xb, timestep=t, return_dict=False, **cond)[0]
            xa, xb = xa + (sigmas[i + 1] - sigmas[i]) * va, xb + (sigmas[i + 1] - sigmas[i]) * vb
    assert torch.equal(xa, expected["a"]) and torch.equal(xb, expected["b"])
    assert ha.stats().last.reused_steps == hb.stats().last.reused_steps == [2, 4]
    ha.remove()
    hb.remove()


def test_explicit_context_api_for_hand_written_loops():
    name = "sd3"  # SD3Transformer2DModel has no cache_context: the explicit API is the way
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    handle = ditcache.apply(model, ditcache.StaticIntervalConfig(interval=2, warmup_steps=0, cooldown_steps=1))
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    x = inputs["hidden_states"]
    with torch.no_grad(), handle.generation(num_steps=5):
        for i in range(5):
            t = torch.tensor([900.0])  # constant timestep: only the explicit step index tells steps apart
            for branch in ("cond", "uncond"):
                with handle.branch(branch, step_index=i):
                    model(hidden_states=x, timestep=t, **cond)
    stats = handle.stats().last
    assert stats.steps == 5
    # interval 2 from step 0 -> steps 1 and 3 reuse; step 4 is a cool-down step (num_steps known).
    assert stats.reused_steps == [1, 3]
    handle.remove()
    with pytest.raises(RuntimeError, match="after handle.remove"):
        handle.reset()


def test_reset_clears_cache_and_stats(setup):
    name, model, inputs, uncond = setup
    handle = ditcache.apply(model, "static-2")
    euler_sample(model, name, inputs, 6, uncond, handle=handle)
    assert handle.stats().cache_bytes > 0
    handle.reset()
    stats = handle.stats()
    assert stats.generations == [] and stats.cache_bytes == 0
    handle.remove()


def test_resolution_change_mid_generation_is_a_clear_error():
    name = "wan"
    model = tiny_model(name)
    small, large = tiny_inputs(name, size=8), tiny_inputs(name, size=12)
    cond = {k: v for k, v in small.items() if k != "hidden_states"}
    handle = ditcache.apply(model, "static-2")
    with torch.no_grad():
        model(hidden_states=small["hidden_states"], timestep=torch.tensor([1000.0]), **cond)
        with pytest.raises(ValueError, match="shape changed"):
            model(hidden_states=large["hidden_states"], timestep=torch.tensor([900.0]), **cond)
        # A new generation at the new resolution works and the cache holds the new shape only.
        out = euler_sample(model, name, large, 4)
    h = handle.stats().last
    assert h.steps == 4 and out.shape == large["hidden_states"].shape
    handle.remove()


def test_nonfinite_outputs_are_never_cached():
    name = "flux"
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    handle = ditcache.apply(model, ditcache.StaticIntervalConfig(interval=2, warmup_steps=0))
    bad = inputs["hidden_states"].clone()
    bad[0, 0, 0] = float("nan")
    with torch.no_grad():
        model(hidden_states=bad, timestep=torch.tensor([1.0]), **cond)  # step 0 computes NaN
        out = model(hidden_states=inputs["hidden_states"], timestep=torch.tensor([0.8]), **cond)[0]  # step 1
    stats = handle.stats().last
    assert stats.nonfinite_events == 1
    assert stats.reused_forwards == 0  # step 1 would have reused, but there was nothing finite to reuse
    assert torch.isfinite(out).all()
    handle.remove()
