"""Block residuals per segment (`policies/block_segments.py`): FORA / TeaCache keep one residual per run of
blocks that hand their tensors straight to each other. A reused step must equal adding every block's own cached
residual (what the per-block bookkeeping did), on every family; model code between blocks splits segments."""

import pytest
import torch

import ditcache
from ditcache.adapters import adapter_for
from ditcache.engine.binding import BoundCall
from ditcache.testing import TINY_MODELS, euler_sample, tiny_inputs, tiny_model

STEPS = 6  # fora-2: steps 0, 1, 2, 4 computed, 3 and 5 reuse every block


def _blocks(model: torch.nn.Module) -> list[tuple[object, torch.nn.Module]]:
    adapter = adapter_for(model)
    return [(spec, block) for spec in adapter.block_lists for block in model.get_submodule(spec.attr)]


class PerBlockResiduals:
    """The reference: forward hooks that cache each block's residual (output - input, per carried tensor) at
    the computed forwards and replace its output by input + residual at the reused ones."""

    def __init__(self, model: torch.nn.Module, reused_forwards: set[int]) -> None:
        self.reused_forwards, self.forward_index = reused_forwards, -1
        self.residuals: dict[int, dict[str, torch.Tensor | None]] = {}
        self.handles = [model.register_forward_pre_hook(self._count)]
        for position, (spec, block) in enumerate(_blocks(model)):
            self.handles.append(block.register_forward_hook(self._hook(position, spec), with_kwargs=True))

    def _count(self, module, args) -> None:
        self.forward_index += 1

    def _hook(self, position, spec):
        def hook(module, args, kwargs, output):
            bound = BoundCall(type(module), args, kwargs)
            inputs = {name: bound.get(name) for name in spec.inputs}
            outputs = dict(zip(spec.outputs, output)) if len(spec.outputs) > 1 else {spec.outputs[0]: output}
            if self.forward_index not in self.reused_forwards:
                self.residuals[position] = {n: None if v is None else v - inputs[n] for n, v in outputs.items()}
                return output
            values = [None if r is None else inputs[n] + r for n, r in self.residuals[position].items()]
            return tuple(values) if len(values) > 1 else values[0]

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_reused_step_equals_per_block_residuals(name):
    inputs = tiny_inputs(name)
    model = tiny_model(name)
    handle = ditcache.apply(model, "fora-2")
    cached = euler_sample(model, name, inputs, STEPS, handle=handle)
    assert _skipped_steps(handle) == [3, 5]
    handle.remove()

    reference = PerBlockResiduals(model, reused_forwards={3, 5})
    expected = euler_sample(model, name, inputs, STEPS)
    reference.remove()
    uncached = euler_sample(model, name, inputs, STEPS)
    assert not torch.allclose(cached, uncached, atol=1e-4)  # reuse changed the result, so the check means something
    torch.testing.assert_close(cached, expected, atol=2e-5, rtol=1e-4)


def _state(handle):
    return handle.branch_state("cond")


def _skipped_steps(handle) -> list[int]:
    """The forwards (one per step, no CFG) that computed no block."""
    return [step for step, blocks in enumerate(handle.stats().generations[0].blocks_computed) if blocks == 0]


def test_flux_blocks_form_one_segment_and_a_write_between_blocks_splits_it():
    model = tiny_model("flux")
    num_blocks = len(_blocks(model))
    handle = ditcache.apply(model, "fora-2")
    euler_sample(model, "flux", tiny_inputs("flux"), 3, handle=handle)
    segments = _state(handle).segments
    assert sorted(segments.residuals) == [0] and segments.inside == set(range(1, num_blocks))
    handle.remove()

    # Model code that writes a carried tensor in place between two blocks (a pre-hook on the second block):
    # the write would be lost inside a segment, so the segment ends there.
    second = _blocks(model)[1][1]

    def write_in_place(module, args, kwargs) -> None:
        kwargs["hidden_states"].mul_(1.0)

    hook = second.register_forward_pre_hook(write_in_place, with_kwargs=True)
    handle = ditcache.apply(model, "fora-2")
    euler_sample(model, "flux", tiny_inputs("flux"), 3, handle=handle)
    segments = _state(handle).segments
    assert sorted(segments.residuals) == [0, 1] and segments.inside == set(range(2, num_blocks))
    handle.remove()
    hook.remove()


def test_inference_mode_tensors_keep_one_segment_per_block():
    """Inference tensors keep no write counter: no segment spans two blocks, and reuse still works."""
    model = tiny_model("flux")
    handle = ditcache.apply(model, "fora-2")
    with torch.inference_mode():
        euler_sample(model, "flux", tiny_inputs("flux"), STEPS, handle=handle)
    segments = _state(handle).segments
    assert sorted(segments.residuals) == list(range(len(_blocks(model)))) and not segments.inside
    assert _skipped_steps(handle) == [3, 5]
    handle.remove()
