"""Config type -> policy class, and preset name -> config.

Dispatch is a dictionary lookup on the exact config type, never an isinstance chain: a new method
registers itself with `register_policy` and `apply` finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

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
        if key in changes:
            raise ValueError(f"policy override {key!r} is given twice in {spec!r}; give each key once")
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    try:
        return config.replace(**changes) if changes else config
    except TypeError as error:
        raise ValueError(f"{spec!r}: {error}") from None


def config_types() -> dict[str, type[PolicyConfig]]:
    """Every registered config type by class name: those with a policy and those behind a preset."""
    types = {cls.__name__: cls for cls in _POLICIES}
    for factory in _PRESETS.values():
        cls = type(factory())
        types.setdefault(cls.__name__, cls)
    return types


def config_from_dict(data: dict[str, Any]) -> PolicyConfig:
    """The config `PolicyConfig.to_dict()` describes (e.g. read back from JSON): `"policy"` names the registered
    config class, the other keys are its fields (missing ones take their defaults); JSON lists become tuples for
    tuple fields. Validated like any config."""
    import dataclasses

    if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
        raise ValueError(f"a config dict needs a 'policy' key naming the config class, got {data!r}")
    types = config_types()
    name = data["policy"]
    if name not in types:
        raise ValueError(f"unknown config class {name!r}; registered: {', '.join(sorted(types))}")
    cls = types[name]
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields) - {"policy"})
    if unknown:
        raise ValueError(f"{name} has no field(s) {unknown}; its fields: {', '.join(fields)}")
    values = {}
    for key, value in data.items():
        if key == "policy":
            continue
        if isinstance(value, list) and "tuple" in str(fields[key].type):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        values[key] = value
    return cls(**values)
