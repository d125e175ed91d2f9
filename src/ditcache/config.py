"""Base class and validation helpers for policy configs.

A config is plain, frozen data. Each policy module defines one config dataclass that subclasses
`PolicyConfig`; validation happens in `__post_init__` and raises `ValueError` naming the field and the
allowed values, so a bad value never reaches a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. Subclasses must be frozen dataclasses."""

    # The calibration profile method a config needs ("mixcache", ...), None when it needs none. Policies look
    # their profile up by it; tests write tiny profiles for it (`ditcache.testing.TINY_PROFILE_MAKERS`).
    profile_method: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        return {"policy": type(self).__name__, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, model: Any) -> PolicyConfig:
        """The config to run on `model` (the transformer), called by `ditcache.apply` before the policy lookup.
        A config that stands for another one (`AutoConfig`: the winner tuned for this model) returns it; most
        configs return themselves."""
        return self


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{_range_text(low, high)}, got {value!r}")
    _check_bounds(name, value, low, high)


def check_float(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{_range_text(low, high, low_open)}, got {value!r}")
    if low_open and low is not None and value <= low:
        raise ValueError(f"{name} must be{_range_text(low, high, low_open)}, got {value!r}")
    _check_bounds(name, value, low, high)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_bounds(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be{_range_text(low, high)}, got {value!r}")


def _range_text(low: float | None, high: float | None, low_open: bool = False) -> str:
    left = ">" if low_open else ">="
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {left} {low}"
    if high is not None:
        return f" <= {high}"
    return ""
