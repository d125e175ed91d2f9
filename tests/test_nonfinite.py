"""The non-finite rule over every preset: a forward that produces NaN is flagged once and never replayed."""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------------------------------------ issue 18
def _last_block(model: torch.nn.Module) -> torch.nn.Module:
    lists = [m for name, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and "blocks" in name]
    return lists[-1][-1]


def _sample_with_one_bad_forward(model, family, handle, bad_step, bad_branch, how):
    """Euler + CFG where one forward (`bad_step`, `bad_branch`) goes non-finite: `how` = "inf" (one element of
    the last block's output is +inf) or "input" (one element of that forward's latent is NaN). The sampler
    keeps the previous latent when the guided prediction is non-finite, so every later input is clean."""
    inputs = tiny_inputs(family)
    branches = {"cond": {k: v for k, v in inputs.items() if k != "hidden_states"}}
    branches["uncond"] = tiny_uncond_inputs(family, inputs)
    inject = {"on": False}

    def poison(module, args, output):
        if not inject["on"]:
            return output
        values = list(output) if isinstance(output, tuple) else [output]
        image = max(range(len(values)), key=lambda i: values[i].numel())  # the image stream, not the text
        values[image] = values[image].clone()
        values[image].view(-1)[0] = float("inf")
        return tuple(values) if isinstance(output, tuple) else values[0]

    hook = _last_block(model).register_forward_hook(poison) if how == "inf" else None
    x, sigmas, outputs, kept = inputs["hidden_states"].clone(), torch.linspace(1.0, 0.0, STEPS + 1), [], []
    context = model.cache_context if hasattr(type(model), "cache_context") else handle.branch
    try:
        with torch.no_grad(), handle.generation(num_steps=STEPS):
            for i in range(STEPS):
                t = torch.full((1,), float(sigmas[i]) * timestep_scale(family))
                result = {}
                for name, kwargs in branches.items():
                    inject["on"] = i == bad_step and name == bad_branch
                    latent = x
                    if inject["on"] and how == "input":
                        latent = x.clone()
                        latent.view(-1)[0] = float("nan")
                    with context(name):
                        result[name] = model(hidden_states=latent, timestep=t, return_dict=False, **kwargs)[0]
                    if inject["on"]:  # what the bad branch keeps for later steps: its fresh state, or the bad step
                        state = handle.branch_state(name)
                        kept.append(state == type(state)())
                    inject["on"] = False
                outputs.append(result)
                guided = result["uncond"] + 3.0 * (result["cond"] - result["uncond"])
                if torch.isfinite(guided).all():
                    x = x + (sigmas[i + 1] - sigmas[i]) * guided
    finally:
        if hook is not None:
            hook.remove()
    return outputs, kept


def _finite_traces(policy, after_step: int) -> bool:
    """Every decision statistic a policy keeps for analysis (PreciseCache's LFDs, TeaCache's rel-L1s) measured
    after `after_step` is a number or +inf (= compute), never NaN."""
    entries = list(getattr(policy, "lfd_trace", [])) + list(getattr(policy, "trace", []) or [])
    values = [entry[-1] for entry in entries if isinstance(entry[0], int) and entry[0] > after_step]
    return all(not (isinstance(v, float) and math.isnan(v)) for v in values)


@pytest.mark.parametrize(
    ("bad_step", "bad_branch", "how"), [(1, "cond", "inf"), (3, "uncond", "inf"), (1, "cond", "input")]
)
@pytest.mark.parametrize("preset", tuple(ditcache.presets()))
def test_after_a_non_finite_forward_the_branch_starts_from_clean_data(
    preset, bad_step, bad_branch, how, profile_dir, monkeypatch
):
    """Issue 18: inf in a block output (or NaN in one forward's latent), in the warm-up or later, on either CFG
    branch. No later forward returns a non-finite value, and the bad branch's next forward reuses nothing (its
    state is fresh again: nothing of the bad step is replayed or decides anything); decision traces hold no NaN."""
    monkeypatch.setenv(PROFILE_DIR_ENV, str(profile_dir))
    model = tiny_model("flux")
    handle = ditcache.apply(model, preset)
    outputs, state_is_fresh = _sample_with_one_bad_forward(model, "flux", handle, bad_step, bad_branch, how)
    records = [r for r in handle.records() if r.generation == handle.records()[-1].generation]
    policy = handle.policy
    handle.remove()
    (bad,) = [r for r in records if r.step == bad_step and r.branch == bad_branch]
    injected = not torch.isfinite(outputs[bad_step][bad_branch]).all()
    # a reused forward runs no block: nothing to poison (warm-ups compute steps 0-1, but static-hermite-3x reuses
    # step 1: it computes steps 0, 3, 6, ...)
    assert injected or bad.kind == "reused"
    assert bad.nonfinite == injected
    for step, result in enumerate(outputs):
        for branch, value in result.items():
            if (step, branch) != (bad_step, bad_branch):
                assert torch.isfinite(value).all(), f"non-finite output at step {step} ({branch})"
    if injected:  # the bad branch starts over: nothing of the bad step is kept, and its next forward reuses none
        assert state_is_fresh == [True]
        (after,) = [r for r in records if r.step == bad_step + 1 and r.branch == bad_branch]
        assert after.kind != "reused" and not after.skipped_submodules
    assert _finite_traces(policy, bad_step)
