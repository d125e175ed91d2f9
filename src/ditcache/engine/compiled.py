"""torch.compile and ditcache: the decision code runs eagerly, the computation it chooses runs compiled.

* `torch.compile(model)` returns an `OptimizedModule`; `apply` hooks the module under it (`unwrap_compiled`)
  and installs the hooks inside `compiling_with(wrapper.dynamo_ctx)`, so each hooked forward (model, blocks,
  submodules) computes through the user's compiler, backend and options included.
* Regional compilation (`model.compile_repeated_blocks()`, `block.compile()`) sets `_compiled_call_impl` on the
  block; a hook adopts it (`CompiledForward.adopt`): the block is called eagerly into our hook and the hook
  computes through the same compiler, so the hook's Python never sits inside a compiled frame, where it would
  be baked into guards (one recompile per block instance and per step).
* The hook entry point is `torch.compiler.disable`d (as diffusers' cache hooks do), so a compiled caller
  graph-breaks there instead of tracing step counters and cache state.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext
from torch.utils._python_dispatch import _get_current_dispatch_mode

Compiler = Callable[[Callable], Callable]  # a torch.compile context: fn -> compiled fn

_INSTALL_COMPILER: contextvars.ContextVar[Compiler | None] = contextvars.ContextVar("ditcache_compiler", default=None)


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module under any `torch.compile(...)` wrappers (itself when it is not compiled)."""
    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def whole_model_compiler(module: torch.nn.Module) -> Compiler | None:
    """The compiler of `torch.compile(model)` (its backend and options), None for an uncompiled module."""
    return module.dynamo_ctx if isinstance(module, OptimizedModule) else None


@contextlib.contextmanager
def compiling_with(compiler: Compiler | None) -> Iterator[None]:
    """Hooks created inside compute through `compiler` (the whole model was compiled by the user)."""
    token = _INSTALL_COMPILER.set(compiler)
    try:
        yield
    finally:
        _INSTALL_COMPILER.reset(token)


def _compiler_of(compiled_fn: Callable) -> Compiler | None:
    """The dynamo context a `torch.compile(fn)` result closes over (`module.compile()` keeps no other handle)."""
    for cell in getattr(compiled_fn, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            if isinstance(cell.cell_contents, _TorchDynamoContext):
                return cell.cell_contents
    return None


class CompiledForward:
    """A hooked module's original forward, run through the user's compiler when there is one.

    Eager under a dispatch mode (ditcache's FLOP counting), which compiled code would bypass.
    """

    def __init__(self, module: torch.nn.Module, original: Callable) -> None:
        self.module, self.original = module, original
        self._compiled: Callable | None = None
        self._adopted: Callable | None = None  # the module's own `_compiled_call_impl`, restored on release
        compiler = _INSTALL_COMPILER.get()
        if compiler is not None:
            self._compiled = compiler(original)
        self.adopt()

    def adopt(self) -> None:
        """Take over a regional compile of the module (done before or after apply): the module is then called
        eagerly into the hook, and the hook computes through that compiler."""
        compiled_call = self.module.__dict__.get("_compiled_call_impl")
        if compiled_call is None:
            return
        compiler = _compiler_of(compiled_call)
        if compiler is None:
            return  # not a dynamo compile we can reproduce: leave it, the hook still runs (graph break)
        self._adopted = compiled_call
        self._compiled = compiler(self.original)
        self.module._compiled_call_impl = None

    def release(self) -> None:
        """Give the module its regional compile back (on hook removal)."""
        if self._adopted is not None and self.module.__dict__.get("_compiled_call_impl") is None:
            self.module._compiled_call_impl = self._adopted
        self._adopted = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None or _get_current_dispatch_mode() is not None:
            return self.original(*args, **kwargs)
        return self._compiled(*args, **kwargs)
