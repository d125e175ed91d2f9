"""Instance-level forward wrapping that can be undone exactly.

We set `module.forward` on the instance (never on the class), remember what the instance dict held
before, and put it back on removal. If someone else wrapped the module after us, we cannot unwrap
without breaking them, so our wrapper turns into a pure pass-through instead.

Other wrappers of `forward` compose with ours in either order: diffusers' HookRegistry (group offloading,
its own caches) also replaces the instance `forward` and calls whatever was there before. Under
torch.compile the handler is never traced (see `compiled.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from .compiled import CompiledForward

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Slot:
    """An attribute that holds a forward callable: the module's own `forward`, accelerate's `_old_forward`
    (model CPU offload), or a function reference of diffusers' HookRegistry (group offloading, diffusers'
    caches). Both libraries call the forward they saw when they wrapped, and put it back when they unwrap."""

    owner: Any
    name: str

    def get(self) -> Any:
        return self.owner.__dict__.get(self.name, _MISSING)

    def set(self, value: Any) -> None:
        if value is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, value)


def _slots(module: torch.nn.Module) -> list[_Slot]:
    """Every slot that may hold `module`'s forward chain, outermost (`module.forward`) first."""
    slots = [_Slot(module, "forward"), _Slot(module, "_old_forward")]
    registry = module.__dict__.get("_diffusers_hook")
    for ref in getattr(registry, "_fn_refs", ()):
        slots += [_Slot(ref, "original_forward"), _Slot(ref, "forward")]
    return slots


def _is_class_forward(value: Any, module: torch.nn.Module) -> bool:
    return getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is type(module).forward


def _innermost_slot(module: torch.nn.Module) -> _Slot:
    """Where the module's class forward is called from: beneath diffusers' / accelerate's wrappers, so that
    they run as they would without ditcache (offloading still onloads) and removing them, or diffusers
    re-applying them on a LoRA load, keeps our hook; `module.forward` when nobody else wraps the module."""
    for slot in _slots(module)[1:]:
        if _is_class_forward(slot.get(), module):
            return slot
    return _Slot(module, "forward")


class ForwardHook:
    """Routes `module`'s forward through `handler(original_forward, args, kwargs)` until `remove()`.

    The hook sits innermost (`_innermost_slot`), so other wrappers compose with it in either order of
    applying and of removing. `original_forward` computes through the user's torch.compile when the module
    (or the whole model) is compiled; the handler itself always runs eagerly (`torch.compiler.disable`), so a
    compiled caller breaks its graph here and no per-step Python state ends up in dynamo's guards.
    """

    def __init__(
        self, module: torch.nn.Module, handler: Callable[[Callable, tuple, dict], Any], outermost: bool = False
    ) -> None:
        self.module = module
        # outermost: `module.forward` itself, around other wrappers (the model-level hook under diffusers'
        # context parallelism must see the whole latent, before diffusers splits it; see Engine.install).
        self._slot = _Slot(module, "forward") if outermost else _innermost_slot(module)
        self._previous = self._slot.get()
        # the bound method, or whatever an earlier (unknown) wrapper installed as `module.forward`
        original = module.forward if self._previous is _MISSING else self._previous
        self._original = original
        self._compute = CompiledForward(module, original)
        self._active = True

        @torch.compiler.disable
        def run(args: tuple, kwargs: dict) -> Any:
            if module.__dict__.get("_compiled_call_impl") is not None:
                self._compute.adopt()  # compile_repeated_blocks() after apply
            return handler(self._compute, args, kwargs)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            return run(args, kwargs)

        self._wrapped = wrapped
        self._slot.set(wrapped)

    def remove(self) -> bool:
        """Splice the hook out of whichever slot holds it now; returns False when it is nowhere to be found
        (an unknown wrapper holds it), which leaves a pure pass-through."""
        self._active = False
        self._compute.release()
        for slot in _slots(self.module):
            if slot.get() is self._wrapped:
                slot.set(self._previous if slot == self._slot else self._original)
                return True
        return False


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
