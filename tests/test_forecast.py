"""Forecasting reused features (engine/forecast.py) and its `forecast` field on every reuse policy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ditcache
from ditcache.calibration.profiles import PROFILE_DIR_ENV
from ditcache.engine.forecast import (
    FORECASTS,
    HERMITE_SIGMA,
    Forecast,
    Forecaster,
    History,
    check_forecast,
    forecast,
    forecast_weights,
)
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs, write_tiny_profiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 10
A, B, C = torch.tensor([3.0, -1.0]), torch.tensor([0.5, 2.0]), torch.tensor([0.1, -0.3])


def quadratic(p: float) -> torch.Tensor:
    return (A + p * B + p * p * C).double()


def linear(p: float) -> torch.Tensor:
    return (A + p * B).double()


def history_of(fn, positions, depth: int = 3) -> History:
    history = History()
    for p in positions:
        history.push(p, fn(p), depth)
    return history


IRREGULAR = (0, 1, 3, 4, 7)  # computed steps of an irregular reuse schedule; the last three are 7, 4, 3


# ---------------------------------------------------------------------------- the module
def test_taylor_orders_are_exact_for_polynomials_of_their_order_on_irregular_steps():
    for target in (8.0, 9.0, 12.0):
        assert torch.allclose(forecast(Forecast.TAYLOR1, history_of(linear, IRREGULAR), target), linear(target))
        assert torch.allclose(forecast(Forecast.TAYLOR2, history_of(quadratic, IRREGULAR), target), quadratic(target))
    # order 1 through (7, f(7)) and (4, f(4)) by hand, on a quadratic: not exact, the chord's extrapolation
    slope = (quadratic(7) - quadratic(4)) / 3
    assert torch.allclose(forecast(Forecast.TAYLOR1, history_of(quadratic, IRREGULAR), 9.0), quadratic(7) + 2 * slope)
    assert not torch.allclose(forecast(Forecast.TAYLOR1, history_of(quadratic, IRREGULAR), 9.0), quadratic(9))


def test_hermite_is_the_scaled_hermite_series_of_the_interpolant():
    """HiCache: sum_k c_k sigma^k H_k(sigma d), c_k the Taylor coefficients at the newest computed step (7):
    for f = A + B p + C p^2, c_1 = B + 14 C, c_2 = C; H_1(x) = 2x, H_2(x) = 4x^2 - 2."""
    s, d = HERMITE_SIGMA, 2.0
    c0, c1, c2 = quadratic(7), (B + 14 * C).double(), C.double()
    by_hand = c0 + c1 * s * (2 * s * d) + c2 * s**2 * (4 * (s * d) ** 2 - 2)
    assert torch.allclose(forecast(Forecast.HERMITE, history_of(quadratic, IRREGULAR), 7 + d), by_hand)


def test_multistep_is_the_interpolant_averaged_over_the_step():
    """Adams-Bashforth-like: mean of the quadratic over [9, 10] = f(9) + f'(9) / 2 + f''/6."""
    by_hand = quadratic(9) + (B + 18 * C).double() / 2 + (2 * C).double() / 6
    assert torch.allclose(forecast(Forecast.MULTISTEP, history_of(quadratic, IRREGULAR), 9.0), by_hand)


def test_weights_sum_to_one_and_fewer_computed_steps_mean_a_lower_order():
    for mode in Forecast:
        assert sum(forecast_weights(mode, [7.0, 4.0, 3.0], 9.0)) == pytest.approx(1.0)
    assert forecast_weights(Forecast.TAYLOR2, [7.0], 9.0) == [1.0]
    two = history_of(linear, (4, 7))
    assert torch.allclose(forecast(Forecast.TAYLOR2, two, 9.0), linear(9))  # order 1 with 2 values
    one = history_of(quadratic, (7,))
    assert forecast(Forecast.TAYLOR2, one, 9.0) is one.newest
    three = history_of(quadratic, IRREGULAR)
    assert forecast(Forecast.TAYLOR2, three, 7.0) is three.newest  # at the newest computed step itself


def test_history_keeps_the_newest_and_restarts_on_an_earlier_position():
    history = history_of(quadratic, IRREGULAR, depth=3)
    assert history.positions == [7, 4, 3] and torch.equal(history.newest, quadratic(7))
    history.push(7, quadratic(7) + 1, 3)  # a second pass of the same step replaces its value
    assert history.positions == [7, 4, 3] and torch.equal(history.newest, quadratic(7) + 1)
    history.push(2, quadratic(2), 3)  # an earlier step: a new generation
    assert history.positions == [2] and len(history.values) == 1
    history.reset()
    assert len(history) == 0 and history.newest is None


def test_trees_are_forecast_leaf_by_leaf():
    def tree(p):
        return {"hidden_states": linear(p), "encoder_hidden_states": None, "pair": (linear(p), 2 * linear(p))}

    got = forecast(Forecast.TAYLOR1, history_of(tree, (2, 5), depth=2), 6.0)
    assert got["encoder_hidden_states"] is None
    assert torch.allclose(got["hidden_states"], linear(6)) and torch.allclose(got["pair"][1], 2 * linear(6))


def test_a_forecast_never_returns_non_finite_values_made_of_finite_ones():
    """fp16: 3 v2 - 3 v1 + v0 overflows where the values are near the fp16 maximum; those elements fall back
    to the newest value, the others are extrapolated (in float32)."""
    history = History()
    for p, value in ((0, 0.0), (1, 30000.0), (2, 60000.0)):
        history.push(p, torch.tensor([value, p * 1.0], dtype=torch.float16), 3)
    out = forecast(Forecast.TAYLOR2, history, 5.0)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert out[0] == 60000.0 and out[1] == 5.0


def test_copy_keeps_no_history_and_hands_the_cached_value_through():
    cached, history = torch.randn(3), History()
    copy = Forecaster.of("copy")
    assert copy.remember(None, history, 4, cached) is cached and len(history) == 0  # no call needed: nothing stored
    assert copy.predict(history_of(linear, (1, 2)), 5, cached) is cached


def test_predict_falls_back_to_the_cached_value_when_the_history_does_not_end_with_it():
    history = history_of(linear, (1, 2))
    assert Forecaster.of("taylor1").predict(history, 5, linear(2)) is not history.newest  # a different tensor
    assert torch.equal(Forecaster.of("taylor1").predict(history, 5, history.newest), linear(5))


def test_config_field_is_validated_by_one_helper_naming_the_field_and_the_values():
    with pytest.raises(ValueError, match="forecast must be one of 'copy', 'taylor1'.*got 'cubic'"):
        check_forecast("cubic")
    for spec in ("fora-3", "static-3", "teacache-0.1", "precisecache-base", "mixcache-acc", "omnicache-traj-slow"):
        with pytest.raises(ValueError, match="forecast must be one of"):
            ditcache.parse_policy(f"{spec}:forecast=cubic")
        assert ditcache.parse_policy(f"{spec}:forecast=taylor2").forecast == "taylor2"
        assert ditcache.preset(spec).forecast == "copy"
    assert ditcache.parse_policy("static-3:forecast=multistep").forecast == "multistep"
    for spec in ("fora-3", "teacache-0.1", "precisecache-flash", "mixcache-acc", "omnicache-traj-slow"):
        with pytest.raises(ValueError, match="multistep"):  # they reuse features, not whole outputs
            ditcache.parse_policy(f"{spec}:forecast=multistep")
    assert ditcache.parse_policy("mixcache-acc:granularities=('step',):forecast=multistep").forecast == "multistep"
    assert set(FORECASTS) == {"copy", "taylor1", "taylor2", "hermite", "multistep"}


# ---------------------------------------------------------------------------- the policies
WIRED = (
    "static-3",
    "fora-3",
    "teacache-0.2",
    "precisecache-base:alpha=5.0",
    "precisecache-flash",
    "mixcache-acc",
    "omnicache-traj-slow",
)


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("forecast-profiles")
    write_tiny_profiles(directory, tiny_model("flux"), (STEPS,))
    return directory


def _run(config, family: str = "flux", nan_step: int | None = None):
    """Euler + CFG on a tiny model: (every forward's output, the records, the handle's cond / uncond states)."""
    model = tiny_model(family)
    handle = ditcache.apply(model, config)
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    inputs = tiny_inputs(family)
    with torch.no_grad(), handle.generation(num_steps=STEPS):
        euler_sample(model, family, inputs, STEPS, cfg_inputs=tiny_uncond_inputs(family, inputs), handle=handle)
    states = [handle.branch_state(branch) for branch in ("cond", "uncond")]
    records = handle.records()
    handle.remove()
    return outputs, records, states


def _histories(state) -> list[History]:
    """Every forecast history of a branch state, nested states (block segments) included."""
    found = []
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        found += [value] if isinstance(value, History) else []
        found += [v for v in value.values() if isinstance(v, History)] if isinstance(value, dict) else []
        found += _histories(value) if dataclasses.is_dataclass(value) and not isinstance(value, History) else []
    return found


@pytest.mark.parametrize("spec", WIRED)
def test_copy_is_the_default_and_forecasts_change_only_what_is_reused(spec, profile_dir, monkeypatch):
    monkeypatch.setenv(PROFILE_DIR_ENV, str(profile_dir))
    default, records, states = _run(ditcache.parse_policy(spec))
    copy, copy_records, copy_states = _run(ditcache.parse_policy(f"{spec}:forecast=copy"))
    assert all(torch.equal(a, b) for a, b in zip(default, copy)) and len(default) == len(copy)
    assert all(len(h) == 0 for state in copy_states for h in _histories(state))  # copy keeps no history
    mode = "taylor1"
    forecast_outputs, forecast_records, forecast_states = _run(ditcache.parse_policy(f"{spec}:forecast={mode}"))
    first_difference = next(i for i, (a, b) in enumerate(zip(default, forecast_outputs)) if not torch.equal(a, b))
    assert (
        records[first_difference].kind == "reused"
        or any(f < 1.0 for f in records[first_difference].block_fraction)
        or records[first_difference].skipped_submodules
    )  # the first output that changes reused something
    assert any(len(h) > 1 for state in forecast_states for h in _histories(state))


@pytest.mark.parametrize("spec", ("static-3", "fora-3", "mixcache-acc:granularities=('block',)"))
def test_forecasts_read_the_kept_copies_of_a_cache_dtype(spec, profile_dir, monkeypatch):
    """With `cache_dtype` the policy keeps what `store` returned (a copy): histories must hold those very
    tensors, or predict would not recognise the cached value and silently copy."""
    monkeypatch.setenv(PROFILE_DIR_ENV, str(profile_dir))
    config = ditcache.parse_policy(f"{spec}:forecast=taylor1:cache_dtype='bfloat16'")
    copy, _, _ = _run(config.replace(forecast="copy"))
    taylor, _, states = _run(config)
    histories = [h for state in states for h in _histories(state) if len(h) > 1]
    assert histories and all(t.dtype == torch.bfloat16 for h in histories for t in _leaves(h.values))
    assert any(not torch.equal(a, b) for a, b in zip(copy, taylor))


def test_reused_outputs_are_the_hand_computed_extrapolation_of_the_computed_ones():
    """A fixed irregular schedule, whole-step reuse: each reused output is the order-2 interpolant through the
    last three computed outputs of its branch, at the reused step."""
    reuse = (3, 5, 6, 8)
    outputs, records, _ = _run(ditcache.ReuseScheduleConfig(reuse_steps=reuse, forecast="taylor2"))
    cond = {r.step: out for r, out in zip(records, outputs) if r.branch == "cond"}
    assert [r.step for r in records if r.kind == "reused" and r.branch == "cond"] == list(reuse)

    def lagrange(points, x):
        total = 0
        for j, pj in enumerate(points):
            weight = 1.0
            for m, pm in enumerate(points):
                weight *= (x - pm) / (pj - pm) if m != j else 1.0
            total = total + weight * cond[pj]
        return total

    for step, points in ((3, (2, 1, 0)), (5, (4, 2, 1)), (6, (4, 2, 1)), (8, (7, 4, 2))):
        assert torch.allclose(cond[step], lagrange(points, step), atol=1e-5), step


@pytest.mark.parametrize(
    "spec", ("static-3:forecast=multistep", "fora-3:forecast=taylor2", "teacache-0.2:forecast=hermite")
)
def test_forecasts_never_store_or_replay_non_finite_values(spec):
    """A NaN forward at a computed step once histories exist: flagged, the branch state (histories included) is
    reset, and no later output or cached value is non-finite."""
    model = tiny_model("flux")
    handle = ditcache.apply(model, spec)
    queries = [m for name, m in model.named_modules() if name.endswith("attn.to_q")]
    poison = {"step": 5, "now": -1}
    hooks = [
        q.register_forward_hook(lambda m, a, out: out.fill_(float("nan")) if poison["now"] == poison["step"] else out)
        for q in queries
    ]
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    inputs = tiny_inputs("flux")
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.no_grad(), handle.generation(num_steps=STEPS):
        for i in range(STEPS):
            poison["now"] = i
            v = model(hidden_states=x, timestep=torch.full((1,), float(sigmas[i])), return_dict=False, **cond)[0]
            if torch.isfinite(v).all():
                x = x + (sigmas[i + 1] - sigmas[i]) * v
    state = handle.branch_state("default")
    stats = handle.stats().last
    for hook in hooks:
        hook.remove()
    handle.remove()
    injected = not torch.isfinite(outputs[5]).all()  # TeaCache may skip every block at step 5
    assert injected or spec.startswith("teacache")
    assert stats.nonfinite_events == int(injected)
    assert all(torch.isfinite(out).all() for step, out in enumerate(outputs) if step != 5)
    for history in _histories(state):
        assert all(torch.isfinite(t).all() for value in history.values for t in _leaves(value))


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _leaves(item)] if isinstance(value, (tuple, list)) else []
