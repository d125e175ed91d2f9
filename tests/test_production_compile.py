"""torch.compile with caching (issue 18): a compiled transformer is accepted, cached output under compile equals
eager cached output, and nothing recompiles after the first generation (dynamo's counters are asserted)."""

import pytest
import torch
from torch._dynamo.utils import counters

import ditcache
from ditcache.testing import euler_sample, tiny_inputs, tiny_model

STEPS = 6
# Output reuse (model hook only), block residual reuse (block hooks), a rel-L1 decision on a block's input.
PRESETS = ("static-2", "fora-2", "teacache-0.1")


def _instance_state(*modules: torch.nn.Module) -> list[dict]:
    """What apply may touch on each module instance: its dict entries (forward, compiled call, attributes)."""
    return [{key: id(value) for key, value in module.__dict__.items()} for module in modules]


def _eager_cached(preset: str, generations: int = 1) -> list[torch.Tensor]:
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    handle = ditcache.apply(model, preset)
    outputs = [euler_sample(model, "flux", inputs, steps=STEPS, handle=handle) for _ in range(generations)]
    handle.remove()
    return outputs


def run_tiny_pipeline(pipe) -> torch.Tensor:
    """One seeded STEPS-step call of a tiny FluxPipeline (`tests/test_pipeline_e2e.py`), latents out."""
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a cat", num_inference_steps=STEPS, height=16, width=16, generator=generator, output_type="latent"
    ).images


def _frames_compiled() -> int:
    return counters["frames"]["ok"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_model_is_accepted_and_never_recompiles(preset):
    """`apply(torch.compile(model))` hooks the model under the wrapper; three generations compile once."""
    reference = _eager_cached(preset, generations=3)
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    compiled = torch.compile(model, backend="eager")
    handle = ditcache.apply(compiled, preset)
    assert handle.model is model
    outputs, frames = [], []
    for _ in range(3):
        outputs.append(euler_sample(compiled, "flux", inputs, steps=STEPS, handle=handle))
        frames.append(_frames_compiled())
    for output, expected in zip(outputs, reference):
        torch.testing.assert_close(output, expected, atol=1e-4, rtol=0)
    assert frames[0] > 0, "nothing was compiled: the compiled wrapper did not run the model"
    assert frames[1] == frames[0] == frames[2], f"recompiled after the first generation: {frames}"
    assert frames[0] <= 16, f"too many frames compiled in one generation: {frames[0]}"
    assert sum(counters["recompiles"].values()) <= 2  # per-step state in guards would recompile every step
    generations = handle.stats().generations
    assert len(generations) == 3
    if preset == "static-2":
        assert [g.reused_forwards for g in generations] == [2, 2, 2]


def test_remove_leaves_compiled_wrapper_and_model_as_they_were():
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    compiled = torch.compile(model, backend="eager")
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    before = _instance_state(compiled, model, *blocks)
    handle = ditcache.apply(compiled, "fora-2")
    assert "forward" in model.__dict__  # hooked under the wrapper
    euler_sample(compiled, "flux", inputs, steps=STEPS, handle=handle)
    handle.remove()
    assert _instance_state(compiled, model, *blocks) == before
    # Removed: the compiled model is the plain compiled model again (bit for bit).
    plain = torch.compile(tiny_model("flux"), backend="eager")
    torch.testing.assert_close(
        euler_sample(compiled, "flux", inputs, steps=3), euler_sample(plain, "flux", inputs, steps=3), atol=0, rtol=0
    )


@pytest.mark.parametrize("order", ["compile-then-apply", "apply-then-compile"])
def test_regional_compile_caches_and_never_recompiles(order):
    """`compile_repeated_blocks()` before or after apply: blocks compute compiled, decisions stay eager."""
    (reference,) = _eager_cached("fora-2")
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    if order == "compile-then-apply":
        model.compile_repeated_blocks(backend="eager")
        compiled_calls = [block._compiled_call_impl for block in model.transformer_blocks]
        handle = ditcache.apply(model, "fora-2")
    else:
        handle = ditcache.apply(model, "fora-2")
        model.compile_repeated_blocks(backend="eager")
        compiled_calls = [block._compiled_call_impl for block in model.transformer_blocks]
    frames = []
    for _ in range(3):
        output = euler_sample(model, "flux", inputs, steps=STEPS, handle=handle)
        torch.testing.assert_close(output, reference, atol=1e-4, rtol=0)
        frames.append(_frames_compiled())
    assert frames[0] > 0
    assert frames[1] == frames[0] == frames[2], f"recompiled after the first generation: {frames}"
    # One graph per block class (two classes in Flux) plus at most a dynamic-shape or first-call recompile.
    assert counters["stats"]["unique_graphs"] <= 4
    handle.remove()
    assert [block._compiled_call_impl for block in model.transformer_blocks] == compiled_calls


def test_compiled_transformer_in_a_pipeline():
    """The usual idiom: `pipe.transformer = torch.compile(pipe.transformer)`, then `apply(pipe)`."""
    pytest.importorskip("transformers")
    from tests.test_pipeline_e2e import tiny_flux_pipeline

    run = run_tiny_pipeline
    pipe = tiny_flux_pipeline()
    handle = ditcache.apply(pipe, "fora-2")
    expected = run(pipe)
    handle.remove()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    handle = ditcache.apply(pipe, "fora-2")
    outputs = [run(pipe) for _ in range(2)]
    frames = _frames_compiled()
    outputs.append(run(pipe))
    assert _frames_compiled() == frames
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-4, rtol=0)
    assert len(handle.stats().generations) == 3
    handle.remove()
