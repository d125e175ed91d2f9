"""Call arguments bound by name, once per module class (diffusers' hooks do the same with `inspect.signature`).

A model or block may be called with any mix of positional and keyword arguments (Wan passes its rotary pair
positionally, Flux passes everything by keyword). Binding them to the forward's signature lets policies and
the engine read every argument by name and call the module again with some of them replaced.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


@functools.cache
def forward_signature(cls: type) -> inspect.Signature:
    """The signature of `cls.forward` without `self`."""
    signature = inspect.signature(cls.forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class BoundCall:
    """One call's `(args, kwargs)`, bound to the forward signature of `cls`."""

    def __init__(self, cls: type, args: tuple, kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs
        self.signature = forward_signature(cls)
        try:
            self._bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{cls.__name__}.forward{self.signature}: {error}") from None
        self._var_keyword = next(
            (p.name for p in self.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )

    @functools.cached_property
    def arguments(self) -> Mapping[str, Any]:
        """Every argument by name, defaults included; `**kwargs` extras appear under their own names."""
        values: dict[str, Any] = {}
        for name, parameter in self.signature.parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                values[name] = parameter.default
        for name, value in self._bound.arguments.items():
            if name == self._var_keyword:
                values.pop(name, None)
                values.update(value)
            else:
                values[name] = value
        return MappingProxyType(values)

    def get(self, name: str) -> Any:
        """One argument by name without building the whole mapping (None when absent)."""
        if name in self._bound.arguments and name != self._var_keyword:
            return self._bound.arguments[name]
        if self._var_keyword is not None and name in self._bound.arguments.get(self._var_keyword, {}):
            return self._bound.arguments[self._var_keyword][name]
        parameter = self.signature.parameters.get(name)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    @property
    def passed(self) -> dict[str, Any]:
        """The arguments actually passed (no defaults), flat: what a keyword-only call needs."""
        values = dict(self._bound.arguments)
        values.update(values.pop(self._var_keyword, {}) if self._var_keyword else {})
        return values

    def replaced(self, values: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """`(args, kwargs)` of the same call with some arguments replaced by name."""
        arguments = dict(self._bound.arguments)
        extras = dict(arguments.get(self._var_keyword, {})) if self._var_keyword else {}
        for name, value in values.items():
            if name in self.signature.parameters and name != self._var_keyword:
                arguments[name] = value
            elif self._var_keyword is not None:
                extras[name] = value
            else:
                raise TypeError(f"forward{self.signature} has no argument {name!r}")
        if self._var_keyword is not None and extras:
            arguments[self._var_keyword] = extras
        bound = inspect.BoundArguments(self.signature, arguments)  # type: ignore[arg-type]
        return bound.args, bound.kwargs
