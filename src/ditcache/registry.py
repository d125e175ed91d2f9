"""Config type -> policy class, and preset name -> config.

Dispatch is a dictionary lookup on the exact config type, never an isinstance chain: a new method
registers itself with `register_policy` and `apply` finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .config import PolicyConfig

if TYPE_CHECKING:
    from .policies.base import Policy

_POLICIES: dict[type[PolicyConfig], type[Policy]] = {}
_PRESETS: dict[str, Callable[[], PolicyConfig]] = {}
_PRESET_HELP: dict[str, str] = {}

P = TypeVar("P")


def register_policy(config_type: type[PolicyConfig]) -> Callable[[P], P]:
    """Class decorator: `@register_policy(MyConfig) class MyPolicy(Policy): ...`."""

    def decorate(policy_cls: P) -> P:
        if config_type in _POLICIES and _POLICIES[config_type] is not policy_cls:
            raise ValueError(f"config type {config_type.__name__} is already registered to {_POLICIES[config_type]}")
        _POLICIES[config_type] = policy_cls  # type: ignore[assignment]
        return policy_cls

    return decorate


def policy_for(config: PolicyConfig) -> type[Policy]:
    try:
        return _POLICIES[type(config)]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in _POLICIES))
        raise TypeError(
            f"config of type {type(config).__name__} has no registered policy; known configs: {known}. "
            "Register one with @ditcache.register_policy(YourConfig)."
        ) from None


def register_preset(name: str, factory: Callable[[], PolicyConfig], help: str = "") -> None:
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = factory
    _PRESET_HELP[name] = help


def preset(name: str) -> PolicyConfig:
    """The config of a named preset, e.g. `preset("fora-3")`."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(sorted(_PRESETS))}") from None


def presets() -> dict[str, str]:
    """Preset names with one line of help each."""
    return dict(sorted(_PRESET_HELP.items()))


def parse_policy(spec: str) -> PolicyConfig:
    """A preset name with optional overrides: "precisecache-base:alpha=0.9:warmup_steps=4".

    Values are Python literals (numbers, tuples, strings); the result is validated like any config."""
    import ast

    name, *overrides = spec.split(":")
    config = preset(name)
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"policy override {item!r} in {spec!r} must look like key=value")
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    try:
        return config.replace(**changes) if changes else config
    except TypeError as error:
        raise ValueError(f"{spec!r}: {error}") from None
