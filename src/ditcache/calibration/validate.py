"""Schemas of calibration profiles, checked when a profile is loaded and again against the model it is applied to.

A profile is JSON a user may edit, copy between machines or receive from someone else, so every field a policy
reads is checked before any model runs: types, ranges, finite values and list lengths that must match the step
count (on load) or the model's block count (`check_blocks`, when applied). Every problem raises one error type,
`InvalidProfileError` (a `ValueError`), naming the file and the field, instead of an IndexError / TypeError or
silent NaN in the middle of a generation.

Each method registers a schema: `register_profile_schema(method, check_data, check_blocks=None)`. Unknown methods
get the header check only (a method registered by a user may not have a schema).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

_MISSING = object()


class InvalidProfileError(ValueError):
    """A profile file that is malformed or tampered with: `source` (the file), `field` (a path such as
    `data.gamma[3]`) and `problem` say what is wrong."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source, self.field, self.problem = source, field, problem
        what = "invalid profile" if field.startswith("data.") else "not a ditcache profile:"
        super().__init__(f"{what} {source}: field {field!r} {problem}; recalibrate or restore the file")


@dataclasses.dataclass
class Fields:
    """Typed reads of one JSON object (`values`) of the profile at `source`; `prefix` names it in errors."""

    source: str
    values: Mapping[str, Any]
    prefix: str = "data"

    def fail(self, field: str, problem: str) -> InvalidProfileError:
        return InvalidProfileError(self.source, f"{self.prefix}.{field}" if self.prefix else field, problem)

    def get(self, field: str, optional: bool = False) -> Any:
        value = self.values.get(field, _MISSING)
        if value is _MISSING and not optional:
            raise self.fail(field, "is missing")
        return None if value is _MISSING else value

    def number(self, field: str, low: float | None = None, high: float | None = None, optional: bool = False) -> Any:
        value = self.get(field, optional)
        if value is not None or not optional:
            self.check_number(field, value, low, high)
        return value

    def check_number(self, field: str, value: Any, low: float | None = None, high: float | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {value!r:.60}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(field, f"must be in [{low}, {high}], got {value!r}")

    def integer(self, field: str, low: int | None = None, high: int | None = None, optional: bool = False) -> Any:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, got {value!r:.60}")
        self.check_number(field, value, low, high)
        return value

    def string(self, field: str, pattern: str | None = None, optional: bool = False) -> Any:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value or (pattern and not re.fullmatch(pattern, value)):
            raise self.fail(field, f"must be a non-empty string{f' matching {pattern}' if pattern else ''}")
        return value

    def mapping(self, field: str, optional: bool = False) -> Fields | None:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a JSON object, got {type(value).__name__}")
        return Fields(self.source, value, f"{self.prefix}.{field}" if self.prefix else field)

    def series(
        self,
        field: str,
        length: int | None,
        low: float | None = None,
        nulls: bool = False,
        optional: bool = False,
    ) -> Any:
        """A list of `length` finite numbers >= `low` (null entries allowed with `nulls`)."""
        values = self.get(field, optional)
        if values is None and optional:
            return None
        if not isinstance(values, list) or (length is not None and len(values) != length):
            raise self.fail(field, f"must be a list of {length if length is not None else 'some'} numbers")
        for i, value in enumerate(values):
            if not (nulls and value is None):
                self.check_number(f"{field}[{i}]", value, low)
        return values

    def indices(self, field: str, stop: int, optional: bool = False, unique: bool = True) -> Any:
        """A list of integers in [0, stop) (distinct with `unique`)."""
        values = self.get(field, optional)
        if values is None and optional:
            return None
        if not isinstance(values, list):
            raise self.fail(field, f"must be a list of integers in [0, {stop})")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < stop:
                raise self.fail(f"{field}[{i}]", f"must be an integer in [0, {stop}), got {value!r:.60}")
        if unique and len(set(values)) != len(values):
            raise self.fail(field, "must not repeat an entry")
        return values


@dataclasses.dataclass(frozen=True)
class Schema:
    check_data: Callable[[Fields, int], None]  # (data fields, num_steps)
    check_blocks: Callable[[Fields, int], None] | None = None  # (data fields, the model's number of blocks)


_SCHEMAS: dict[str, Schema] = {}


def register_profile_schema(
    method: str, check_data: Callable[[Fields, int], None], check_blocks: Callable[[Fields, int], None] | None = None
) -> None:
    """Check the `data` of `method`'s profiles on load (`check_data(fields, num_steps)`) and against the model's
    block count when applied (`check_blocks(fields, num_blocks)`); raise `fields.fail(field, problem)`."""
    _SCHEMAS[method] = Schema(check_data, check_blocks)


def validate_header(raw: Any, source: str) -> None:
    """The fields every profile has: method, model_name, fingerprint, num_steps and a `data` object."""
    if not isinstance(raw, dict):
        raise InvalidProfileError(source, "<root>", f"must be a JSON object, got {type(raw).__name__}")
    header = Fields(source, raw, prefix="")
    header.string("method")
    header.string("model_name")
    header.string("fingerprint")
    header.integer("num_steps", 1, 100_000)
    header.mapping("data")


def validate_profile(raw: Any, source: str) -> None:
    """The header and the method's data schema."""
    validate_header(raw, source)
    schema = _SCHEMAS.get(raw["method"])
    if schema is not None:
        schema.check_data(Fields(source, raw["data"]), raw["num_steps"])


def validate_blocks(method: str, data: Mapping[str, Any], source: str, num_blocks: int) -> None:
    """The method's block-count checks (list lengths, block positions) against a model of `num_blocks` blocks."""
    schema = _SCHEMAS.get(method)
    if schema is not None and schema.check_blocks is not None:
        schema.check_blocks(Fields(source, data), num_blocks)


def load_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, prefix: str) -> None:
    """`module.load_state_dict(state)` once every tensor's name, shape and values are checked: a weights file
    of another model or a tampered one raises `InvalidProfileError` naming the file and the tensor."""
    expected = module.state_dict()
    for key in sorted(set(expected) | set(state)):
        field = f"{prefix}{key}"
        if key not in state:
            raise InvalidProfileError(source, field, "is missing")
        if key not in expected:
            raise InvalidProfileError(source, field, f"is not a weight of {type(module).__name__}")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise InvalidProfileError(
                source, field, f"has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
            )
        if not bool(torch.isfinite(state[key]).all()):
            raise InvalidProfileError(source, field, "holds NaN / inf")
    module.load_state_dict(state)
