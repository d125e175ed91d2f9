"""The speed-class presets (issue 16) land in their MACs class: deterministic step schedules and MACs counts.

A class is the frontier's (bench/frontier.py): MACs speedup >= class - 0.1. The presets must land there by
their schedule alone, on any model: counts of computed steps are exact, MACs speedups are read from the engine's
stats of a 50-step Euler + CFG generation on the tiny Flux model, whose embedders and final layer cost about the
same share of a step as ref-image's (the largest share among the reference models).
"""

from __future__ import annotations

import pytest
import torch

import ditcache
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 50
# preset -> (steps computed of 50, MACs speedup range on the tiny Flux model)
CLASSES = {
    "fora-hermite-1.5x": (33, (1.4, 1.6)),
    "fora-hermite-2x": (26, (1.85, 2.0)),
    "static-hermite-3x": (17, (2.9, 3.1)),
    "fora-hermite-3of10": (16, (2.9, 3.2)),
}


def computed_steps(config: ditcache.StaticIntervalConfig, steps: int = STEPS) -> list[int]:
    return [step for step in range(steps) if config.computes(step, steps)]


@pytest.mark.parametrize("name", CLASSES)
def test_preset_computes_the_stated_number_of_steps(name):
    assert len(computed_steps(ditcache.preset(name))) == CLASSES[name][0]


def computed_steps_unknown_count(config: ditcache.StaticIntervalConfig, steps: int = STEPS) -> list[int]:
    return [step for step in range(steps) if config.computes(step, None)]


def test_the_1_5x_preset_computes_both_ends_and_every_other_step_between():
    config = ditcache.preset("fora-hermite-1.5x")
    assert computed_steps(config) == list(range(8)) + list(range(8, 42, 2)) + list(range(42, STEPS))
    assert config.forecast == "hermite"


def test_without_a_step_count_the_cooldown_steps_are_computed_first():
    # A bare loop gives no step count: the 1.5x preset then computes its first 16 steps, the same 33 of 50.
    config = ditcache.preset("fora-hermite-1.5x")
    unknown = computed_steps_unknown_count(config)
    assert unknown == list(range(16)) + list(range(16, STEPS, 2))
    assert len(unknown) == len(computed_steps(config)) == 33
    plain = ditcache.StaticIntervalConfig(interval=2, warmup_steps=2)  # no cool-down: unchanged
    assert computed_steps_unknown_count(plain) == computed_steps(plain)


def test_the_3x_preset_computes_every_third_step_from_step_0_and_reuses_whole_outputs():
    config = ditcache.preset("static-hermite-3x")
    assert computed_steps(config) == list(range(0, STEPS, 3))
    assert (config.reuse, config.forecast) == ("output", "hermite")


def test_3_of_10_spreads_its_computed_steps_evenly():
    computed = computed_steps(ditcache.preset("fora-hermite-3of10"))
    assert computed == [0, 1, 5, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38, 41, 45, 48]
    gaps = {b - a for a, b in zip(computed[1:], computed[2:])}
    assert gaps == {3, 4}  # 3 of every 10: gaps of 3, 3, 4


def test_computed_one_is_plain_fora_and_out_of_range_is_refused():
    plain = ditcache.StaticIntervalConfig(interval=3, warmup_steps=2)
    assert computed_steps(plain.replace(computed=1)) == computed_steps(plain) == [0, 1, *range(2, STEPS, 3)]
    assert computed_steps(plain.replace(computed=3)) == list(range(STEPS))  # every step of every 3
    with pytest.raises(ValueError, match=r"computed must be in \[1, 3\]"):
        plain.replace(computed=4)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("count_known", [True, False], ids=["num_steps", "bare-loop"])
def test_preset_macs_speedup_lands_in_its_class_on_a_tiny_model(name, count_known):
    model = tiny_model("flux")
    handle = ditcache.apply(model, name)
    inputs = tiny_inputs("flux")
    generation = handle.generation(num_steps=STEPS) if count_known else handle.generation()
    with torch.no_grad(), generation:
        euler_sample(model, "flux", inputs, STEPS, cfg_inputs=tiny_uncond_inputs("flux", inputs), handle=handle)
    stats = handle.stats().last
    handle.remove()
    low, high = CLASSES[name][1]
    assert low <= stats.macs_speedup <= high, f"{name}: {stats.macs_speedup:.3f}x MACs"
    if ditcache.preset(name).reuse == "output":  # reused steps cost nothing: exactly steps / computed
        assert stats.macs_full * CLASSES[name][0] == stats.macs_executed * STEPS
