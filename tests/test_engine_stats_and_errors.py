"""Counts and MACs from stats; validation errors; unsupported models."""

import dataclasses

import pytest
import torch

import ditcache
from ditcache.engine.macs import measure_costs
from ditcache.testing import euler_sample


@pytest.mark.parametrize(
    ("interval", "warmup", "cooldown", "steps", "expected"),
    [(2, 2, 0, 8, [3, 5, 7]), (3, 1, 1, 10, [2, 3, 5, 6, 8]), (4, 0, 2, 9, [1, 2, 3, 5, 6])],
)
def test_static_policy_reuses_exactly_the_expected_steps(setup, interval, warmup, cooldown, steps, expected):
    name, model, inputs, uncond = setup
    config = ditcache.StaticIntervalConfig(interval=interval, warmup_steps=warmup, cooldown_steps=cooldown)
    # Flux/SD3/Wan tiny loops do not pass a step count: give it explicitly for the cool-down.
    handle = ditcache.apply(model, config)
    with handle.generation(num_steps=steps):
        euler_sample(model, name, inputs, steps, uncond, handle=handle)
    stats = handle.stats().last
    assert stats.reused_steps == expected
    assert stats.reused_forwards == 2 * len(expected)
    # Output reuse costs nothing: executed MACs are exactly the computed share of the full cost.
    computed = steps - len(expected)
    assert stats.macs_full * computed == stats.macs_executed * steps
    handle.remove()


def test_block_reuse_macs_keep_the_embedders(setup):
    name, model, inputs, uncond = setup
    handle = ditcache.apply(model, ditcache.StaticIntervalConfig(interval=2, warmup_steps=2, reuse="blocks"))
    euler_sample(model, name, inputs, 6, uncond, handle=handle)
    stats = handle.stats().last
    blocks = handle.policy.model_view.block_names
    handle.remove()
    timestep = torch.ones(len(inputs["hidden_states"]))  # one per row: DiT-style blocks embed it themselves
    timestep_arg = handle.policy.adapter.timestep_arg  # HiDream calls it `timesteps`
    cost = measure_costs(lambda: model(**{timestep_arg: timestep}, **inputs), model, blocks)
    skipped_forwards = stats.blocks_computed.count(0.0)
    assert skipped_forwards == 4  # steps 3 and 5, both branches
    assert stats.macs_executed == stats.macs_full - skipped_forwards * sum(cost.blocks)
    assert 1.0 < stats.macs_speedup < 12 / 8


def test_macs_count_attention():
    from ditcache.testing import tiny_inputs, tiny_model

    model = tiny_model("wan")
    inputs = tiny_inputs("wan")
    cost = measure_costs(lambda: model(timestep=torch.tensor([1.0]), **inputs), model, ["blocks.0"])
    # Linear layers of one block: q, k, v, out (self), q, out (cross) 16x16 on 48 tokens... plus attention.
    tokens = 3 * 4 * 4
    attention_macs = 2 * 2 * tokens * tokens * 8  # batch 1, 2 heads, QK^T and PV, head dim 8
    linear_only = measure_costs(lambda: None, model, ["blocks.0"])
    assert linear_only.total == 0
    assert cost.blocks[0] > attention_macs


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": 2.5}, "interval"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"cooldown_steps": True}, "cooldown_steps"),
        ({"reuse": "tokens"}, "reuse"),
    ],
)
def test_invalid_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ditcache.StaticIntervalConfig(**kwargs)


def test_configs_are_frozen_plain_data():
    config = ditcache.preset("fora-3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.interval = 5
    assert config.to_dict() == {
        "policy": "StaticIntervalConfig",
        "interval": 3,
        "warmup_steps": 2,
        "cooldown_steps": 0,
        "reuse": "blocks",
        "forecast": "copy",
        "computed": 1,
    }
    with pytest.raises(ValueError, match="interval"):
        config.replace(interval=0)


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="fora-3"):
        ditcache.preset("nope")


def test_unsupported_model_says_how_to_register():
    with pytest.raises(TypeError) as error:
        ditcache.apply(torch.nn.Linear(2, 2), "none")
    message = str(error.value)
    assert "FluxTransformer2DModel" in message and "WanTransformer3DModel" in message
    assert "register_adapter" in message


def test_registered_adapter_makes_a_subclass_work():
    from diffusers import WanTransformer3DModel

    from ditcache.adapters import adapter_for

    class MyWan(WanTransformer3DModel):
        pass

    assert adapter_for(MyWan.__new__(MyWan)).name == "wan"


def test_unregistered_config_type_is_rejected():
    @dataclasses.dataclass(frozen=True)
    class Orphan(ditcache.PolicyConfig):
        pass

    from ditcache.testing import tiny_model

    with pytest.raises(TypeError, match="no registered policy"):
        ditcache.apply(tiny_model("flux"), Orphan())


def test_stats_summary_and_dict(setup):
    name, model, inputs, uncond = setup
    handle = ditcache.apply(model, "static-2")
    euler_sample(model, name, inputs, 6, uncond, handle=handle)
    stats = handle.stats()
    assert "forwards reused" in stats.summary()
    d = stats.to_dict()
    assert d["generations"][0]["reused_forwards"] == stats.last.reused_forwards == 4
    assert d["macs_speedup"] == pytest.approx(12 / 8)
    handle.remove()
