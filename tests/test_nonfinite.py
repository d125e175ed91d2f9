"""The non-finite rule over every preset: a forward that produces NaN is flagged once and never replayed."""

from __future__ import annotations

import pytest
import torch

import ditcache
from ditcache.calibration.profiles import PROFILE_DIR_ENV
from ditcache.testing import timestep_scale, tiny_inputs, tiny_model, tiny_uncond_inputs, write_tiny_profiles

FAMILIES = ("flux", "wan")
STEPS = 8


def _query_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The query projection inside every block's self-attention: NaN there reaches block outputs, residuals
    and attention outputs, i.e. everything a policy may cache, whichever blocks the policy runs."""
    return [module for name, module in model.named_modules() if name.endswith(("attn.to_q", "attn1.to_q"))]


def _sample_with_one_nan_forward(model, family, handle, nan_step):
    """Euler + CFG; the cond forward of `nan_step` computes NaN where it runs a block. Like a sampler that
    retries a failed step, a non-finite guided prediction leaves the latent unchanged, so later forwards get
    finite inputs."""
    inputs = tiny_inputs(family)
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    uncond = tiny_uncond_inputs(family, inputs)
    inject = {"on": False}

    def poison(module, args, output):
        return output.fill_(float("nan")) if inject["on"] else output

    hooks = [module.register_forward_hook(poison) for module in _query_projections(model)]
    x, sigmas, outputs = inputs["hidden_states"].clone(), torch.linspace(1.0, 0.0, STEPS + 1), []
    branch = model.cache_context if hasattr(type(model), "cache_context") else handle.branch
    try:
        with torch.no_grad(), handle.generation(num_steps=STEPS):
            for i in range(STEPS):
                t = torch.full((1,), float(sigmas[i]) * timestep_scale(family))
                inject["on"] = i == nan_step
                with branch("cond"):
                    v = model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
                inject["on"] = False
                with branch("uncond"):
                    u = model(hidden_states=x, timestep=t, return_dict=False, **uncond)[0]
                guided = u + 3.0 * (v - u)
                outputs.append((v, u))
                if torch.isfinite(guided).all():
                    x = x + (sigmas[i + 1] - sigmas[i]) * guided
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, x


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nonfinite-profiles")
    for family in FAMILIES:
        write_tiny_profiles(directory, tiny_model(family), (STEPS,))
    return directory


@pytest.mark.parametrize("nan_step", (0, 3))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", tuple(ditcache.presets()))
def test_a_nan_forward_is_flagged_once_and_never_replayed(preset, family, nan_step, profile_dir, monkeypatch):
    """Step 0 is computed by every policy, so its caches would be the first to hold NaN; step 3 is mid-way,
    computed by some policies (then flagged) and reused by others (then nothing is non-finite at all)."""
    monkeypatch.setenv(PROFILE_DIR_ENV, str(profile_dir))
    model = tiny_model(family)
    handle = ditcache.apply(model, preset)
    outputs, final = _sample_with_one_nan_forward(model, family, handle, nan_step)
    stats = handle.stats().last
    handle.remove()
    injected = not torch.isfinite(outputs[nan_step][0]).all()
    assert injected or nan_step > 0  # step 0 always runs its blocks
    assert stats.nonfinite_events == int(injected)
    for step, (cond, uncond) in enumerate(outputs):
        if step != nan_step:
            assert torch.isfinite(cond).all() and torch.isfinite(uncond).all(), f"NaN replayed at step {step}"
    assert torch.isfinite(final).all()
