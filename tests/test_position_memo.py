"""Rotary tables computed once per input while ditcache is applied (`engine/position_memo.py`): bit-identical
output on every family that declares them, counted hits and misses, and never handed back after an in-place
write, a weight change, a new resolution or under inference mode."""

import pytest
import torch

import ditcache
from ditcache.adapters import adapter_for
from ditcache.testing import TINY_MODELS, euler_sample, tiny_inputs, tiny_model

STEPS = 4


def _families_with_tables() -> list[str]:
    return [name for name in TINY_MODELS if adapter_for(tiny_model(name)).position_tables]


class CallCounter:
    """Counts a module's calls (a torch forward hook fires on handed-back tables too) and keeps the outputs."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.outputs: list[object] = []
        self.handle = module.register_forward_hook(lambda module, args, output: self.outputs.append(output))

    def remove(self) -> None:
        self.handle.remove()


def _table_module(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, adapter_for(model).position_tables[0].attr)


def test_the_families_with_rotary_modules_declare_them():
    assert set(_families_with_tables()) == {
        "wan",
        "skyreels-v2",
        "hunyuan-video",
        "flux",
        "chroma",
        "flux2",
        "hidream",
        "cogview4",
        "hunyuanimage",
    }


@pytest.mark.parametrize("name", _families_with_tables())
def test_tables_are_computed_once_and_the_output_is_bit_identical(name):
    inputs = tiny_inputs(name)
    model = tiny_model(name)
    expected = euler_sample(model, name, inputs, STEPS)
    attr = adapter_for(model).position_tables[0].attr
    counter = CallCounter(_table_module(model))
    handle = ditcache.apply(model, "none")
    first = euler_sample(model, name, inputs, STEPS, handle=handle)
    second = euler_sample(model, name, inputs, STEPS, handle=handle)
    counts = handle.position_tables()[attr]
    handle.remove()
    counter.remove()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    per_forward = len(counter.outputs) // (2 * STEPS)  # Flux 2: image and text ids
    assert per_forward >= 1 and len(counter.outputs) == 2 * STEPS * per_forward
    assert (counts.misses, counts.hits) == (per_forward, (2 * STEPS - 1) * per_forward)
    assert "forward" not in _table_module(model).__dict__  # the hook is gone


def test_a_new_resolution_computes_new_tables_and_the_old_ones_stay():
    model = tiny_model("flux")
    small, large = tiny_inputs("flux", size=8), tiny_inputs("flux", size=16)
    expected = [euler_sample(model, "flux", inputs, 2) for inputs in (small, large, small)]
    handle = ditcache.apply(model, "none")
    got = [euler_sample(model, "flux", inputs, 2, handle=handle) for inputs in (small, large, small)]
    counts = handle.position_tables()["pos_embed"]
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert (counts.misses, counts.hits) == (2, 4)


def test_tables_written_in_place_are_computed_again():
    model = tiny_model("wan")
    inputs = tiny_inputs("wan")
    expected = euler_sample(model, "wan", inputs, 3)
    counter = CallCounter(model.rope)
    handle = ditcache.apply(model, "none")
    euler_sample(model, "wan", inputs, 1, handle=handle)
    cos, _ = counter.outputs[-1]
    cos.mul_(1.0)  # same values, but a write the memo must not trust
    got = euler_sample(model, "wan", inputs, 3, handle=handle)
    counts = handle.position_tables()["rope"]
    handle.remove()
    counter.remove()
    assert torch.equal(got, expected)
    assert (counts.misses, counts.hits) == (2, 2)


def test_a_weight_change_computes_the_tables_again():
    model = tiny_model("wan")
    inputs = tiny_inputs("wan")
    handle = ditcache.apply(model, "none")
    euler_sample(model, "wan", inputs, 2, handle=handle)
    with torch.no_grad():
        model.rope.freqs_cos.mul_(0.5)  # a rotary buffer: the tables must follow it
    got = euler_sample(model, "wan", inputs, 2, handle=handle)
    counts = handle.position_tables()["rope"]
    handle.remove()
    assert (counts.misses, counts.hits) == (2, 2)
    assert torch.equal(got, euler_sample(model, "wan", inputs, 2))


def test_inference_mode_tables_are_never_handed_back():
    model = tiny_model("flux")
    inputs = tiny_inputs("flux")
    with torch.inference_mode():
        expected = euler_sample(model, "flux", inputs, 3)
        handle = ditcache.apply(model, "none")
        got = euler_sample(model, "flux", inputs, 3, handle=handle)
        counts = handle.position_tables()["pos_embed"]
        handle.remove()
    assert torch.equal(got, expected)
    assert (counts.misses, counts.hits) == (3, 0)


def test_calls_outside_a_cached_forward_are_not_memoized():
    model = tiny_model("flux")
    ids = torch.zeros(16, 3)
    handle = ditcache.apply(model, "fora-2")
    model.pos_embed(ids)
    model.pos_embed(ids)
    counts = handle.position_tables()["pos_embed"]
    handle.remove()
    assert (counts.misses, counts.hits) == (0, 0)


def test_position_ids_on_an_accelerator_are_not_compared():
    from ditcache.adapters import PositionTable
    from ditcache.engine.position_memo import PositionMemo

    memo = PositionMemo(torch.nn.Identity(), PositionTable("pos_embed", by_value=("ids",)), lambda: 0)
    key, values = memo._summary({"ids": torch.zeros(4, 3)})
    assert len(values) == 1 and key[0][0] == "ids"
    assert memo._summary({"ids": torch.zeros(4, 3, device="meta")}) is None  # a sync on a GPU: never compared
