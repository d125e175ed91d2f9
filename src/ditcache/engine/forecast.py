"""Forecasting reused features from the steps actually computed, instead of copying the last one.

A policy that reuses a feature (the model output, a block's residual, an attention output, a token update)
at a step it does not compute normally returns the value cached at the last computed step: order 0. Peers
extrapolate (TaylorSeer, HiCache, AB-Cache). This module gives every policy the same choice through one config
field, `forecast`:

- `"copy"`: the last computed value (order 0, what every policy did before; bit-identical to it);
- `"taylor1"` / `"taylor2"`: the polynomial of order 1 / 2 through the last 2 / 3 computed values, evaluated
  at the reused step (TaylorSeer's Taylor series, with divided differences over the real step distances, so
  irregular reuse schedules are extrapolated exactly for polynomials of that order);
- `"hermite"`: HiCache's scaled-Hermite series: the Taylor coefficients c_k of the order-2 interpolant at the
  newest computed step, with d^k replaced by sigma^k H_k(sigma d) (physicists' Hermite polynomials, contraction
  `HERMITE_SIGMA`), which damps the higher orders far from the last computed step;
- `"multistep"` (whole-step output only): Adams-Bashforth-like: the order-2 interpolant of the model output
  averaged over the reused step's interval [s, s + 1] (what an explicit multistep method integrates) rather
  than evaluated at s.

Positions are sampling step indices (`ForwardInfo.step`): always known, on every model; distances between
computed steps are the real ones. Every forecast is a linear combination sum_j w_j v_j of the stored values
with weights from the positions only (python floats: no host sync). A `History` keeps the values of the last
`order + 1` computed steps (the tensors the policy cached anyway, not copies): a forecast costs one
multiply-add per value. Values may be tensors or dicts / tuples / lists of tensors (None stays None).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from .calls import ForwardCall

T = TypeVar("T")
HERMITE_SIGMA = 0.5  # HiCache's contraction factor: sigma^k H_k(sigma d) ~ (2 sigma^2)^k d^k for large d


class Forecast(enum.Enum):
    COPY = "copy"
    TAYLOR1 = "taylor1"
    TAYLOR2 = "taylor2"
    HERMITE = "hermite"
    MULTISTEP = "multistep"

    @property
    def order(self) -> int:
        """Highest polynomial order, i.e. how many older computed values (besides the newest) it uses."""
        return {"copy": 0, "taylor1": 1}.get(self.value, 2)


FORECASTS: tuple[str, ...] = tuple(mode.value for mode in Forecast)
FEATURE_FORECASTS: tuple[str, ...] = tuple(m for m in FORECASTS if m != Forecast.MULTISTEP.value)


def check_forecast(value: Any, allowed: Sequence[str] = FORECASTS, where: str = "", name: str = "forecast") -> None:
    """The config validator every reuse policy calls: `value` must be one of `allowed`; `where` says why a mode
    is missing (e.g. multistep where only features are reused)."""
    if value not in allowed:
        reason = f" ({where})" if where else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}{reason}; got {value!r}")


@dataclasses.dataclass
class History:
    """One cached feature at the last computed steps, newest first: `values[j]` computed at `positions[j]`
    (strictly decreasing). The values are the tensors the policy cached (and stored) anyway: no copies."""

    positions: list[float] = dataclasses.field(default_factory=list)
    values: list[Any] = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        self.positions, self.values = [], []

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def newest(self) -> Any:
        return self.values[0] if self.values else None

    def push(self, position: float, value: Any, depth: int) -> None:
        """Add the value computed at `position`, keeping the `depth` newest. The same position again (a second
        pass of one step) replaces the newest; an earlier one (a new generation) starts over."""
        if self.positions and position <= self.positions[0]:
            drop = 1 if position == self.positions[0] else len(self.positions)
            del self.positions[:drop], self.values[:drop]
        self.positions.insert(0, position)
        self.values.insert(0, value)
        del self.positions[depth:], self.values[depth:]


def forecast_weights(mode: Forecast, positions: Sequence[float], target: float) -> list[float]:
    """Weights w_j (sum 1) with forecast = sum_j w_j value(positions[j]): positions newest first; uses
    `mode.order` + 1 of them at most (fewer when fewer were computed: a lower order)."""
    return list(_weights(mode, tuple(positions[: mode.order + 1]), float(target)))


@functools.lru_cache(maxsize=4096)
def _weights(mode: Forecast, points: tuple[float, ...], target: float) -> tuple[float, ...]:
    # Memoized: every block (segment, submodule) of a reused forward asks for the same weights, and a solve
    # costs ~0.1 ms of Python / numpy where the tensor work of a reused step is a few ms.
    if mode is Forecast.COPY or len(points) == 1:
        return (1.0,) + (0.0,) * (len(points) - 1)
    order = len(points) - 1
    shifts = np.array(points, dtype=np.float64) - points[0]  # s_j = p_j - p_0 (s_0 = 0)
    d = float(target - points[0])
    # value_j = sum_k c_k s_j^k (c_k: Taylor coefficients at p_0) -> c = V^-1 v; forecast = b . c = (V^-T b) . v
    vandermonde = shifts[:, None] ** np.arange(order + 1)[None, :]
    basis = np.array([_basis(mode, k, d) for k in range(order + 1)])
    return tuple(float(w) for w in np.linalg.solve(vandermonde.T, basis))


def _basis(mode: Forecast, k: int, d: float) -> float:
    """What d^k (the Taylor basis at distance d from the newest computed step) becomes in each mode."""
    if mode is Forecast.HERMITE:
        return HERMITE_SIGMA**k * _hermite(k, HERMITE_SIGMA * d)
    if mode is Forecast.MULTISTEP:  # mean of s^k over [d, d + 1]
        return ((d + 1) ** (k + 1) - d ** (k + 1)) / (k + 1)
    return d**k


def _hermite(k: int, x: float) -> float:
    """Physicists' Hermite polynomial H_k(x): H_0 = 1, H_1 = 2x, H_{k+1} = 2x H_k - 2k H_{k-1}."""
    previous, current = 1.0, 2.0 * x
    if k == 0:
        return previous
    for n in range(1, k):
        previous, current = current, 2.0 * x * current - 2.0 * n * previous
    return current


def forecast(mode: Forecast, history: History, target: float) -> Any:
    """The value of `history`'s feature at position `target`: the newest value itself for copy, a single
    computed value or the newest position, else sum_j w_j values[j] (accumulated in float32 for 16-bit
    tensors; in float16, whose maximum is 65504, an element that overflows falls back to the newest value, so
    a forecast never replays NaN / inf made of finite values)."""
    weights = forecast_weights(mode, history.positions, target)
    if len(weights) == 1 or target == history.positions[0]:
        return history.newest
    return tree_map(lambda *values: _combine(values, weights), *history.values[: len(weights)])


def _combine(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    newest = values[0]
    low = newest.dtype in (torch.float16, torch.bfloat16)
    out = torch.mul(newest.float() if low else newest, weights[0])
    for value, weight in zip(values[1:], weights[1:]):
        out.add_(value.float() if low else value, alpha=weight)
    out = out.to(newest.dtype)
    if newest.dtype is not torch.float16:
        # Stored values are finite (`all_finite` at store time) and float32's range (3e38) dwarfs any feature
        # times these extrapolation weights, so only float16 can overflow; the mask cost ~3% of a step.
        return out
    return torch.where(torch.isfinite(out), out, newest)


def tree_map(fn: Callable[..., torch.Tensor], tree: T, *others: Any) -> T:
    """`fn` on matching tensors of equally shaped trees (tensor, dict, tuple, list); any other leaf (None, a
    number) is the first tree's."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, *others)
    if isinstance(tree, dict):
        return {key: tree_map(fn, value, *(o[key] for o in others)) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, value, *(o[i] for o in others)) for i, value in enumerate(tree))
    return tree


@dataclasses.dataclass(frozen=True)
class Forecaster:
    """What a policy holds for its config's `forecast`: `remember` after computing a feature, `predict` when
    reusing it. With "copy" both hand the cached value through untouched (bit-identical to plain reuse) and no
    history is kept."""

    mode: Forecast = Forecast.COPY

    @classmethod
    def of(cls, name: str) -> Forecaster:
        return cls(Forecast(name))

    @property
    def copies(self) -> bool:
        return self.mode is Forecast.COPY

    def remember(self, call: ForwardCall, history: History, position: float, value: T) -> T:
        """Record `value`, computed at `position`, and return it. `value` must be what `call.store` returned
        (the copy the policy keeps): the engine checks it for NaN / inf at the end of the forward and resets the
        branch state, histories included, if it is not finite, so a forecast only ever combines finite values.
        `call` is the forward the value was stored in."""
        if not self.copies:
            history.push(float(position), value, self.mode.order + 1)
        return value

    def remember_at(
        self, call: ForwardCall, histories: dict[Hashable, History], key: Hashable, position: float, value: T
    ) -> T:
        """`remember` in the history of `key` (created on first use)."""
        if self.copies:
            return value
        return self.remember(call, histories.setdefault(key, History()), position, value)

    def predict(self, history: History | None, position: float, cached: T) -> T:
        """The value to reuse at `position`: `cached` (the last computed value) for copy or without a history,
        else the forecast from the history."""
        if self.copies or history is None or not len(history) or history.newest is not cached:
            return cached
        return forecast(self.mode, history, float(position))


COPY = Forecaster()
