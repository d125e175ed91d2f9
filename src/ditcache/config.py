"""Base class and validation helpers for policy configs.

A config is plain, frozen data. Each policy module defines one config dataclass that subclasses
`PolicyConfig`; validation happens in `__post_init__` and raises `ValueError` naming the field and the
allowed values, so a bad value never reaches a model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, ClassVar

CACHE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. Subclasses must be frozen dataclasses.

    Every config also takes two keyword-only options on where its cache lives (they change memory, not the
    method; `to_dict` leaves them out while unset):

    Args:
        cache_dtype (`str`, *optional*, defaults to `None`):
            Keep every cached tensor in this dtype (`"bfloat16"`, `"float16"` or `"float32"`; a `torch.dtype`
            is accepted too); it comes back in the model's dtype where it is used. None = as computed.
        cache_device (`str`, *optional*, defaults to `None`):
            Keep every cached tensor on this device (`"cpu"`, `"cuda:1"`, ...; a `torch.device` is accepted);
            it comes back to the model's device where it is used. None = where it was computed.

    Example:
        >>> import ditcache
        >>> config = ditcache.parse_policy("fora-3:cache_dtype='bfloat16'")
        >>> config.cache_dtype, config == ditcache.preset("fora-3").replace(cache_dtype="bfloat16")
        ('bfloat16', True)
    """

    # The calibration profile method a config needs ("mixcache", ...), None when it needs none. Policies look
    # their profile up by it; tests write tiny profiles for it (`ditcache.testing.TINY_PROFILE_MAKERS`).
    profile_method: ClassVar[str | None] = None
    # Keyword-only, so that subclasses keep their positional fields (`StaticIntervalConfig(3)` still works);
    # out of repr, so that a config prints as its method's fields (read them as attributes or in `to_dict`).
    cache_dtype: str | None = dataclasses.field(default=None, kw_only=True, repr=False)
    cache_device: str | None = dataclasses.field(default=None, kw_only=True, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every subclass's own `__post_init__` first turns numpy / 0-d tensor numbers into Python ones, so
        # np.float32(0.1) is accepted (and stored as 0.1) while the checks stay strict about types.
        super().__init_subclass__(**kwargs)
        check = cls.__dict__.get("__post_init__")
        if check is not None:

            def __post_init__(self: PolicyConfig) -> None:
                _normalise_fields(self)
                check(self)

            cls.__post_init__ = __post_init__
        resolve = cls.__dict__.get("resolve")
        if resolve is not None:

            def resolve_keeping_cache_options(self: PolicyConfig, model: Any) -> PolicyConfig:
                # A config standing for another (AutoConfig) hands its cache placement on to the one it picks.
                return _with_cache_options(resolve(self, model), self)

            cls.resolve = resolve_keeping_cache_options

    def __post_init__(self) -> None:
        _normalise_fields(self)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for name in ("cache_dtype", "cache_device"):
            if values[name] is None:
                del values[name]
        return {"policy": type(self).__name__, **values}

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, model: Any) -> PolicyConfig:
        """The config to run on `model` (the transformer), called by `ditcache.apply` before the policy lookup.
        A config that stands for another one (`AutoConfig`: the winner tuned for this model) returns it; most
        configs return themselves."""
        return self


def python_number(value: Any) -> Any:
    """`value` as a Python int / float / bool when it is a numpy scalar or a 0-d array / tensor, unchanged
    otherwise (tuples element by element). Python numbers, strings and None pass through as they are."""
    if value is None or type(value) in (bool, int, float, str):  # np.float64 subclasses float: converted below
        return value
    if isinstance(value, tuple):
        return tuple(python_number(item) for item in value)
    if getattr(value, "shape", None) != () or not hasattr(value, "item"):
        return value
    if hasattr(value, "detach"):  # a 0-d torch tensor: through numpy, to keep its dtype's precision
        value = value.detach().cpu().numpy()
    value = value[()]  # a 0-d numpy array -> its numpy scalar
    if type(value).__name__ in ("bool_", "bool"):  # numpy.bool_: a bool, which integer checks reject
        return bool(value)
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        # np.float32(0.1) means 0.1: the shortest decimal that round-trips its own precision, not 0.10000000149
        return float(str(value)) if getattr(value, "itemsize", 8) < 8 else float(value)
    return value


def _normalise_fields(config: PolicyConfig) -> None:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        converted = python_number(value)
        if converted is not value:
            object.__setattr__(config, field.name, converted)  # frozen: set once, during __init__
    _check_cache_options(config)


def _check_cache_options(config: PolicyConfig) -> None:
    """`cache_dtype` / `cache_device` as canonical strings ("bfloat16", "cuda:1"); torch objects accepted."""
    import torch

    dtype, device = config.cache_dtype, config.cache_device
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype is not None:
        check_choice("cache_dtype", dtype, (*CACHE_DTYPES, None))
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise ValueError(f"cache_device must be None, a device name such as 'cpu' or a torch.device: {device!r}")
        try:
            device = str(torch.device(device))
        except (RuntimeError, ValueError):
            raise ValueError(f"cache_device must name a torch device such as 'cpu' or 'cuda:0': {device!r}") from None
    object.__setattr__(config, "cache_dtype", dtype)
    object.__setattr__(config, "cache_device", device)


def _with_cache_options(resolved: PolicyConfig, source: PolicyConfig) -> PolicyConfig:
    options = {name: getattr(source, name) for name in ("cache_dtype", "cache_device") if getattr(source, name)}
    return resolved.replace(**options) if options and resolved is not source else resolved


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
