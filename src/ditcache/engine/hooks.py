"""Instance-level forward wrapping that can be undone exactly.

We set `module.forward` on the instance (never on the class), remember what the instance dict held
before, and put it back on removal. If someone else wrapped the module after us, we cannot unwrap
without breaking them, so our wrapper turns into a pure pass-through instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_MISSING = object()


class ForwardHook:
    """Replaces `module.forward` by `handler(original_forward, args, kwargs)` until `remove()`."""

    def __init__(self, module: torch.nn.Module, handler: Callable[[Callable, tuple, dict], Any]) -> None:
        self.module = module
        self._previous = module.__dict__.get("forward", _MISSING)
        original = module.forward  # bound method, or whatever an earlier hook installed
        self._active = True

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            return handler(original, args, kwargs)

        self._wrapped = wrapped
        module.forward = wrapped

    def remove(self) -> bool:
        """Restore the module; returns False when a later wrapper forced a pass-through instead."""
        self._active = False
        if self.module.__dict__.get("forward") is not self._wrapped:
            return False
        if self._previous is _MISSING:
            del self.module.forward
        else:
            self.module.forward = self._previous
        return True


class AttributeOverride:
    """Sets an instance attribute (e.g. `cache_context`) and restores the instance dict on removal."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name = obj, name
        self._previous = obj.__dict__.get(name, _MISSING)
        self._value = value
        setattr(obj, name, value)

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is not self._value:
            return
        if self._previous is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self._previous)
