"""Thresholds that fit the model: TeaCache's and PreciseCache's accumulate-and-reset triggers from a calibration run.

Both methods sum a per-step change statistic (TeaCache: relative L1 of the first block's modulated input;
PreciseCache: the low-frequency difference of a downsampled trial forward) and reuse while the sum stays below a
threshold. A constant threshold only fits the model it was tuned on (the statistic's scale differs from model to
model), so the calibration records the statistic along one uncached generation and the policy derives the
threshold that makes the rule reuse a target share of the steps (`target_reuse`) on this very model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..engine.calls import ForwardCall, sample_of
from ..policies.precisecache import PreciseCacheConfig, PreciseCachePolicy
from ..registry import register_policy
from .profiles import Profile, ProfileMismatchError, model_fingerprint
from .record import CalibrationRun, record


def reused_steps(values: Sequence[float | None], threshold: float, warmup: int) -> list[int]:
    """Steps the accumulate-and-reset rule reuses when each step's value is measured against the previous step
    (TeaCache: the modulated input of every forward): from `warmup` on, add the step's value; reuse while the
    sum stays below `threshold`, otherwise compute and start again from 0. `None` (unknown) computes."""
    reused, accumulated = [], 0.0
    for step, value in enumerate(values):
        if step < warmup or value is None:
            continue
        accumulated += value
        if accumulated < threshold:
            reused.append(step)
        else:
            accumulated = 0.0
    return reused


def reused_steps_since_computed(by_lag: dict[int, Sequence[float | None]], threshold: float, warmup: int) -> list[int]:
    """The same rule when a step's value is measured against the last *computed* step (PreciseCache: the trial
    forward against the cached prediction): `by_lag[k][t]` is the value at step t against step t - k; a lag
    beyond the recorded ones computes."""
    num_steps = len(next(iter(by_lag.values())))
    reused, accumulated, computed = [], 0.0, 0
    for step in range(1, num_steps):
        values = by_lag.get(step - computed)
        value = None if values is None else values[step]
        if step >= warmup and value is not None:
            accumulated += value
            if accumulated < threshold:
                reused.append(step)
                continue
        accumulated, computed = 0.0, step
    return reused


def threshold_for(count_at: Callable[[float], int], want: int, upper: float) -> float:
    """The smallest threshold whose rule reuses at least `want` steps (bisection: the number of reused steps
    only grows with the threshold); `upper` (the most reuse possible) if the target is out of reach."""
    if count_at(upper) < want:
        return upper
    low, high = 0.0, upper
    for _ in range(60):
        middle = (low + high) / 2
        if count_at(middle) >= want:
            high = middle
        else:
            low = middle
    return high


def calibrated_threshold(data: dict, num_steps: int, target_reuse: float, warmup: int) -> float:
    """The threshold reusing `ceil(target_reuse x num_steps)` steps under the rule the profile was made for."""
    want = int(np.ceil(target_reuse * num_steps))
    if "by_lag" in data:
        by_lag = {int(k): v for k, v in data["by_lag"].items()}
        _check_series(by_lag.values(), num_steps)
        upper = sum(v for series in by_lag.values() for v in series if v is not None) + 1.0
        return threshold_for(lambda t: len(reused_steps_since_computed(by_lag, t, warmup)), want, upper)
    values = data.get("values")
    _check_series([values], num_steps)
    upper = sum(v for v in values if v is not None) + 1.0
    return threshold_for(lambda t: len(reused_steps(values, t, warmup)), want, upper)


def warmup_maximum(data: dict, warmup: int) -> float:
    """The largest consecutive-step value of the warm-up steps 1..warmup-1 (what PreciseCache's alpha scales)."""
    values = [v for v in data["values"][1:warmup] if v is not None]
    if not values or max(values) <= 0:
        raise ProfileMismatchError(f"threshold profile has no positive value in the warm-up steps 1..{warmup - 1}")
    return max(values)


def _check_series(series: Any, num_steps: int) -> None:
    for values in series:
        if (
            not isinstance(values, list)
            or len(values) != num_steps
            or not all(v is None or (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0) for v in values)
        ):
            raise ProfileMismatchError(f"threshold profile must hold {num_steps} per-step values (>= 0 or null)")


def _per_step(trace: Sequence[tuple[int, float]], num_steps: int) -> list[float | None]:
    """Mean value per step over branches / samples; None where a step has no value."""
    sums: dict[int, list[float]] = {}
    for step, value in trace:
        if np.isfinite(value):
            sums.setdefault(step, []).append(value)
    return [float(np.mean(sums[s])) if s in sums else None for s in range(num_steps)]


def calibrate_teacache(model: torch.nn.Module, generation: CalibrationRun, model_name: str | None = None) -> Profile:
    """Relative L1 of the first block's modulated input per step along one uncached generation."""
    from ..policies.teacache import TeaCacheConfig  # noqa: PLC0415

    policy, _ = record(model, TeaCacheConfig(threshold=0.0), generation)
    values = _per_step([(step, value) for step, _, value in policy.trace], generation.num_steps)
    return _profile("teacache", model, model_name, generation, {"values": values})


@dataclasses.dataclass(frozen=True)
class LfdTraceConfig(PreciseCacheConfig):
    """Internal: compute every step; LFD of each step's trial forward to the predictions 1..max_lag steps back."""

    max_lag: int = 8


@register_policy(LfdTraceConfig)
class LfdTracePolicy(PreciseCachePolicy):
    def reset(self) -> None:
        super().reset()
        self.by_lag: dict[int, dict[int, float]] = {}  # lag -> step -> LFD (the first branch of each step)
        self.history: dict[str, list[tuple[int, torch.Tensor]]] = {}  # branch -> recent (step, prediction)

    def forward(self, call: ForwardCall) -> Any:
        step, history = call.info.step, self.history.setdefault(call.info.branch, [])
        if history and not any(step in values for values in self.by_lag.values()):
            lfds = self.trial_lfds(call, [prediction for _, prediction in history])
            for (previous, _), lfd in zip(history, lfds):
                self.by_lag.setdefault(step - previous, {})[step] = lfd
        output = call.run()
        history.append((step, sample_of(output).detach()))
        del history[: -self.config.max_lag]
        return output


def calibrate_precisecache(
    model: torch.nn.Module, generation: CalibrationRun, model_name: str | None = None
) -> Profile:
    """LFD per step against the predictions of the 1..8 steps before, along one uncached generation (the live
    rule compares the trial with the last computed step's prediction, however old)."""
    policy, _ = record(model, LfdTraceConfig(), generation)
    steps = generation.num_steps
    by_lag = {str(lag): [values.get(s) for s in range(steps)] for lag, values in sorted(policy.by_lag.items())}
    return _profile("precisecache", model, model_name, generation, {"by_lag": by_lag, "values": by_lag["1"]})


def _profile(method: str, model: torch.nn.Module, name: str | None, generation: CalibrationRun, data: dict) -> Profile:
    return Profile(
        method=method,
        model_name=name or type(model).__name__,
        fingerprint=model_fingerprint(model),
        num_steps=generation.num_steps,
        data={**generation.meta, "guidance": generation.guidance, **data},
    )
