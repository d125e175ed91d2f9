"""Contract suite: every registered preset x every tiny diffusers family (flux, sd3, wan).

Nothing here names a preset: a new policy gets every check by registering a preset (`register_preset`). One
that needs a calibration profile says so with `profile_method` on its config and registers a maker of tiny
profiles in `ditcache.testing.TINY_PROFILE_MAKERS`; the suite writes those into a temporary directory and
points $DITCACHE_PROFILE_DIR at it.

Checks: exact removal, applying twice, state across generations and `reset()`, cond/uncond isolation,
batch rows vs single rows, and that every preset (but `none`) reuses something on some tiny model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import pytest
import torch

import ditcache
from ditcache.applicability import applies
from ditcache.calibration.profiles import (
    PROFILE_DIR,
    PROFILE_DIR_ENV,
    ProfileMismatchError,
    find_profile,
    model_fingerprint,
    profile_dirs,
)
from ditcache.engine.engine import ENGINE_ATTR
from ditcache.testing import (
    TINY_MODELS,
    TINY_PROFILE_MAKERS,
    timestep_kwargs,
    timestep_scale,
    tiny_inputs,
    tiny_model,
    tiny_negative_inputs,
    tiny_uncond_inputs,
    write_tiny_profiles,
)
from ditcache.tiny import tiny_family

PRESETS = tuple(ditcache.presets())
STEPS = 6  # a generation in most checks; the state check also runs 8
PROFILE_STEPS = (6, 8)  # step counts the tiny profiles are written for
# "Does it reuse at all" runs 8 steps first, then 6: on the tiny random models PreciseCache's LFD (trial forward
# on a 4x-downsampled latent vs the downsampled cached prediction) barely changes from step to step, because it
# is dominated by the resolution gap of the trial, not by the trajectory. With delta = alpha x the largest
# warm-up LFD, alpha 0.5 (precisecache-base) reuses no step of 8 on any family (flux LFDs 0.99-1.21 vs delta
# 0.58; wan 1.45-2.84 vs 1.42), but step 4 of 6 on wan.
REUSE_STEPS = (8, 6, 20)  # 20: presets with long warm-ups (fora-hermite-1.5x computes its first 16 in a bare loop)
GUIDANCE = 3.0
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "class_labels")
BATCHED += ("encoder_attention_mask", "encoder_hidden_states_t5", "pooled_embeds")  # Lumina2, HiDream
BATCHED += ("original_size", "target_size", "crop_coords")  # CogView4
BATCH_AXIS = {"encoder_hidden_states_llama3": 1}  # HiDream's Llama stack (layers, B, S, D)
# Policies whose reuse schedule depends on nothing but the step index: their batch rows must be comparable.
FIXED_SCHEDULES = (ditcache.NoCacheConfig, ditcache.StaticIntervalConfig, ditcache.ReuseScheduleConfig)


def _config(preset: str) -> ditcache.PolicyConfig:
    return ditcache.preset(preset)


def _applies(preset: str, family: str) -> bool:
    """Whether the preset's method applies to the family's class (`ditcache.applicability`): Sana's conv
    feed-forward rules out token subsets, for instance; `apply` raises for those (checked below)."""
    return applies(_config(preset), tiny_family(family).model_class)


CASES = [pytest.param(p, f, id=f"{p}-{f}") for p in PRESETS for f in TINY_MODELS if _applies(p, f)]
NOT_APPLICABLE = [pytest.param(p, f, id=f"{p}-{f}") for p in PRESETS for f in TINY_MODELS if not _applies(p, f)]


# ------------------------------------------------------------------------------------------------- fixtures
@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-profiles")
    for family in TINY_MODELS:
        write_tiny_profiles(directory, _model(family), PROFILE_STEPS)
    return directory


@pytest.fixture(autouse=True)
def _profiles(request, profile_dir, monkeypatch):
    """Presets that need a calibration profile find the tiny ones through $DITCACHE_PROFILE_DIR."""
    preset = request.node.callspec.params.get("preset") if hasattr(request.node, "callspec") else None
    if preset is not None and type(_config(preset)).profile_method is not None:
        monkeypatch.setenv(PROFILE_DIR_ENV, str(profile_dir))
    yield
    for family in TINY_MODELS:  # a failing check must not leave hooks on the shared models
        engine = getattr(_model(family), ENGINE_ATTR, None)
        if engine is not None:
            engine.remove()


# ------------------------------------------------------------------------------------------------- helpers
def _branch_context(model: torch.nn.Module, handle: Any) -> Any:
    if hasattr(type(model), "cache_context"):
        return model.cache_context
    if handle is not None:
        return handle.branch
    return lambda name, **hints: contextlib.nullcontext()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    family: str,
    inputs: dict[str, Any],
    steps: int,
    uncond: dict[str, Any] | None = None,
    handle: Any = None,
    guidance: float | None = GUIDANCE,
) -> torch.Tensor:
    """Flow-matching Euler sampling driven the way a diffusers pipeline drives the transformer: every forward
    inside `cache_context(branch, step_index=i, num_inference_steps=steps)` (`handle.branch(...)` for models
    without it), so a new call starts a new generation and the step count is known. With `uncond`, each step
    runs cond then uncond; `guidance=None` moves the latent with the cond prediction alone (the uncond forward
    still runs), so cond's inputs do not depend on uncond's."""
    branch = _branch_context(model, handle)
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((x.shape[0],), float(sigmas[i]) * timestep_scale(family))
        with branch("cond", step_index=i, num_inference_steps=steps):
            v = model(hidden_states=x, return_dict=False, **timestep_kwargs(model, t), **cond)[0]
        if uncond is not None:
            with branch("uncond", step_index=i, num_inference_steps=steps):
                u = model(hidden_states=x, return_dict=False, **timestep_kwargs(model, t), **uncond)[0]
            if guidance is not None:
                v = u + guidance * (v - u)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def _cfg_inputs(family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    inputs = tiny_inputs(family)
    return inputs, tiny_uncond_inputs(family, inputs)


@functools.cache
def _untouched(family: str, steps: int) -> torch.Tensor:
    model = _model(family)
    assert getattr(model, ENGINE_ATTR, None) is None
    inputs, uncond = _cfg_inputs(family)
    return generate(model, family, inputs, steps, uncond)


@functools.cache
def _fresh(preset: str, family: str, steps: int) -> tuple[torch.Tensor, Any]:
    """Apply on the untouched model, one CFG generation, remove: the output and its generation stats."""
    model = _model(family)
    inputs, uncond = _cfg_inputs(family)
    handle = ditcache.apply(model, preset)
    try:
        out = generate(model, family, inputs, steps, uncond, handle=handle)
        stats = handle.stats()
    finally:
        handle.remove()
    assert len(stats.generations) == 1
    return out, stats.last


def _capture_outputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], Any]:
    outputs: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda mod, args, out: outputs.append(out[0].clone()))
    return outputs, hook


def _decisions(stats: Any) -> tuple[list, list, list]:
    # Tokens per block too: TokenCache's Eq. 12 shares its per-block token counts across the batch, so a row alone
    # may update [2, 1] tokens where the batch updates [1, 2]: the same blocks computed per forward, other decisions.
    return list(stats.reused), list(stats.blocks_computed), list(stats.block_tokens)


@contextlib.contextmanager
def _leaf_trace(model: torch.nn.Module) -> Any:
    """Names of the leaf modules that actually ran, in order: which blocks (and attention / MLP parts) were
    computed, where the stats only count them."""
    trace: list[str] = []
    hooks = [
        module.register_forward_hook(lambda mod, args, out, name=name: trace.append(name))
        for name, module in model.named_modules()
        if not any(True for _ in module.children())
    ]
    try:
        yield trace
    finally:
        for hook in hooks:
            hook.remove()


def _reuses_something(stats: Any) -> bool:
    return (
        stats.reused_forwards > 0
        or sum(stats.blocks_computed) < stats.blocks_total * stats.forwards
        or stats.token_fraction < 1.0
        or stats.macs_executed < stats.macs_full  # e.g. attention / MLP outputs reused inside computed blocks
    )


# ------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(("preset", "family"), CASES)
def test_remove_restores_exact_outputs(preset, family):
    model = _model(family)
    reference = _untouched(family, STEPS)
    inputs, uncond = _cfg_inputs(family)
    attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    handle = ditcache.apply(model, preset)
    try:
        cached = generate(model, family, inputs, STEPS, uncond, handle=handle)
    finally:
        handle.remove()
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs  # every instance attribute restored
    assert torch.equal(generate(model, family, inputs, STEPS, uncond), reference)
    assert torch.isfinite(cached).all()
    if isinstance(_config(preset), ditcache.NoCacheConfig):
        assert torch.equal(cached, reference)


@pytest.mark.parametrize(("preset", "family"), CASES)
def test_apply_twice_raises_and_first_handle_keeps_working(preset, family):
    model = _model(family)
    inputs, uncond = _cfg_inputs(family)
    handle = ditcache.apply(model, preset)
    try:
        with pytest.raises(RuntimeError):
            ditcache.apply(model, preset)
        out = generate(model, family, inputs, STEPS, uncond, handle=handle)
        assert handle.stats().last.steps == STEPS
    finally:
        handle.remove()
    assert not handle.active
    assert torch.equal(out, _fresh(preset, family, STEPS)[0])
    assert torch.equal(generate(model, family, inputs, STEPS, uncond), _untouched(family, STEPS))


@pytest.mark.parametrize(("preset", "family"), CASES)
def test_state_across_generations_and_reset(preset, family):
    model = _model(family)
    inputs, uncond = _cfg_inputs(family)
    handle = ditcache.apply(model, preset)
    try:
        generate(model, family, inputs, 6, uncond, handle=handle)
        assert [g.steps for g in handle.stats().generations] == [6]
        handle.reset()
        assert handle.stats().generations == []
        out8 = generate(model, family, inputs, 8, uncond, handle=handle)
        out6 = generate(model, family, inputs, 6, uncond, handle=handle)  # no reset: a new generation is detected
        stats = handle.stats()
    finally:
        handle.remove()
    assert [g.steps for g in stats.generations] == [8, 6]
    assert [g.forwards for g in stats.generations] == [16, 12]
    for out, generation, steps in ((out8, stats.generations[0], 8), (out6, stats.generations[1], 6)):
        fresh_out, fresh_stats = _fresh(preset, family, steps)
        assert _decisions(generation) == _decisions(fresh_stats)
        assert torch.equal(out, fresh_out)


@pytest.mark.parametrize(("preset", "family"), CASES)
def test_cond_branch_ignores_uncond_inputs(preset, family):
    model = _model(family)
    inputs, uncond = _cfg_inputs(family)
    other = tiny_negative_inputs(family, inputs)
    runs = []
    for negative in (uncond, other):
        handle = ditcache.apply(model, preset)
        outputs, hook = _capture_outputs(model)
        try:
            # guidance=None: the latent follows cond alone, so any change in cond's outputs comes from the cache
            generate(model, family, inputs, STEPS, negative, handle=handle, guidance=None)
            couples = handle.policy.couples_cfg_branches
        finally:
            hook.remove()
            handle.remove()
        assert len(outputs) == 2 * STEPS
        runs.append((outputs[0::2], outputs[1::2]))
    (cond_a, uncond_a), (cond_b, uncond_b) = runs
    assert not torch.equal(uncond_a[0], uncond_b[0])  # the change reached the uncond branch
    checked = cond_a[:1] if couples else cond_a
    for step, (a, b) in enumerate(zip(checked, cond_b)):
        assert torch.equal(a, b), f"cond output of step {step} depends on the uncond inputs"


_BATCH_COMPARABLE: dict[tuple[str, str], bool] = {}


@pytest.mark.parametrize(("preset", "family"), CASES)
@pytest.mark.filterwarnings("ignore:MixCache. no separate unconditional branch")
def test_batch_rows_match_single_rows(preset, family):
    model = _model(family)
    both = tiny_inputs(family, batch=2)
    runs = []
    for rows in (slice(0, 2), slice(0, 1), slice(1, 2)):
        inputs = {k: (v[rows] if k in BATCHED else v) for k, v in both.items()}
        inputs.update({k: both[k][:, rows] for k in BATCH_AXIS if k in both})
        handle = ditcache.apply(model, preset)
        try:
            with _leaf_trace(model) as trace:
                out = generate(model, family, inputs, STEPS, handle=handle)
            stats = handle.stats().last
        finally:
            handle.remove()
        # Same reuse decisions = same stats (reused forwards, blocks computed) and the same modules run.
        runs.append((out, (*_decisions(stats), trace)))
    (batched, decisions), *singles = runs
    comparable = [single_decisions == decisions for _, single_decisions in singles]
    for i, ((out, _), same) in enumerate(zip(singles, comparable)):
        if same:  # same reuse decisions: the rows must not depend on their batch neighbours
            torch.testing.assert_close(out, batched[i : i + 1], rtol=1e-4, atol=1e-5)
    _BATCH_COMPARABLE[(preset, family)] = all(comparable)
    if isinstance(_config(preset), FIXED_SCHEDULES):
        assert all(comparable), f"a fixed schedule decided differently on a batch and on its rows: {decisions}"


def test_batch_rows_comparable_count():
    """How many presets x families had comparable batch rows (needs the batch-rows cases of this run)."""
    if len(_BATCH_COMPARABLE) < len(CASES):
        pytest.skip("runs after every test_batch_rows_match_single_rows case")
    comparable = sorted(f"{p}-{f}" for (p, f), same in _BATCH_COMPARABLE.items() if same)
    fixed = [f"{p}-{f}" for p in PRESETS for f in TINY_MODELS if isinstance(_config(p), FIXED_SCHEDULES)]
    print(f"batch rows comparable for {len(comparable)} of {len(CASES)} cases: {', '.join(comparable)}")
    assert set(fixed) <= set(comparable)


@pytest.mark.parametrize("preset", [p for p in PRESETS if not isinstance(_config(p), ditcache.NoCacheConfig)])
def test_every_preset_reuses_on_some_tiny_model(preset):
    seen = []
    for steps in REUSE_STEPS:
        for family in (f for f in TINY_MODELS if _applies(preset, f)):
            stats = _fresh(preset, family, steps)[1]
            if _reuses_something(stats):
                return
            seen.append(f"{family}@{steps}: {stats.forwards} forwards, {sum(stats.blocks_computed)} blocks")
    pytest.fail(f"{preset} never reused anything on a tiny model ({'; '.join(seen)}): the contract is vacuous")


@pytest.mark.parametrize(("preset", "family"), NOT_APPLICABLE)
def test_methods_that_cannot_apply_raise_up_front(preset, family):
    model = _model(family)
    with pytest.raises(TypeError, match=f"does not apply to {type(model).__name__}"):
        ditcache.apply(model, preset)
    assert getattr(model, ENGINE_ATTR, None) is None


def test_profiles_are_found_in_the_user_directory_then_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert profile_dirs() == [tmp_path / "cache" / "ditcache" / "profiles", PROFILE_DIR]
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    assert profile_dirs() == [tmp_path, PROFILE_DIR]
    model = _model("wan")
    for method in TINY_PROFILE_MAKERS:
        with pytest.raises(ProfileMismatchError, match="searched") as error:
            find_profile(method, model, 7)
        shipped = str(error.value).split(f"{PROFILE_DIR} (")[1].split(")")[0].split(", ")
        assert f"{tmp_path} (none)" in str(error.value)
        assert {"ref-image@50", "ref-video@50"} <= set(shipped)  # other reference models may have theirs too
    write_tiny_profiles(tmp_path, model, [7])
    for method in TINY_PROFILE_MAKERS:
        profile = find_profile(method, model, 7)
        assert (profile.method, profile.fingerprint, profile.num_steps) == (method, model_fingerprint(model), 7)
    assert find_profile("mixcache", model, 7, directory=tmp_path).method == "mixcache"
    with pytest.raises(ProfileMismatchError, match="no such directory"):
        find_profile("mixcache", model, 7, directory=tmp_path / "missing")
