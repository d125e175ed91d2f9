"""Weight-change detection: cached features are stale once the weights they were computed with change.

Loading, fusing, unloading or hot-swapping a LoRA, `load_state_dict`, or moving the model to another dtype /
device while a handle is applied must make the next step recompute. `WeightWatch.changed()` is called once per
model forward and costs a read of the parameters' metadata, remembered from one walk over the modules (no
tensor reads), plus, when peft adapters are present, one reduction over the adapter weights:

* parameter identity, `_version` (bumped by in-place writes such as `load_state_dict`'s `copy_`), dtype and
  shape: catches loads, unloads (the set of parameters changes when peft injects or removes layers), dtype
  casts and rank changes. Not the data pointer or device: offloading (group offloading, model CPU offload)
  moves the same values between devices at every forward, which must not drop the cache;
* each peft tuner layer's active, merged and disabled adapters and their scaling: `fuse_lora` / `unfuse_lora`
  write the base weight through `.data` (invisible to `_version`) but change `merged_adapters`;
  `set_adapters` / `disable_lora` change only these;
* the norms of the adapter weights, compared on the CPU with a relative tolerance (they may be computed on
  another device next time): peft's hot swap copies same-rank weights in through `.data`.

An in-place write through `.data` to a base weight by hand is the one change it cannot see: call
`handle.reset()` after one.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class _AdapterState:
    """What a peft tuner layer computes with, besides its weights."""

    active: tuple[str, ...]
    merged: tuple[str, ...]
    disabled: bool
    scaling: tuple[tuple[str, float], ...]


def _is_tuner_layer(module: torch.nn.Module) -> bool:
    # peft's BaseTunerLayer, by duck typing so that peft stays optional
    return hasattr(module, "merged_adapters") and hasattr(module, "active_adapters") and hasattr(module, "scaling")


def _adapter_state(layer: Any) -> _AdapterState:
    scaling = layer.scaling if isinstance(layer.scaling, dict) else {}
    return _AdapterState(
        active=tuple(layer.active_adapters),
        merged=tuple(layer.merged_adapters),
        disabled=bool(getattr(layer, "disable_adapters", False)),
        scaling=tuple(sorted((str(k), float(v)) for k, v in scaling.items())),
    )


_ADAPTER_WEIGHTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=0.0))


class _Layout:
    """The model's parameters and buffers, walked once (a walk over `_modules` costs 0.1-0.3 ms on a 150-module
    model, several ms on a 1000-module one, every forward): `unchanged()` then reads only the remembered
    containers (which members they hold) and tensors (in-place write counter, dtype and shape)."""

    def __init__(self, model: torch.nn.Module) -> None:
        modules, stack = [], [model]
        while stack:
            module = stack.pop()
            modules.append(module)
            stack += [child for child in module._modules.values() if child is not None]
        self.modules = modules  # held, like the tensors, so that no id in `members` is reused while remembered
        self.containers = [c for m in modules for c in (m._parameters, m._buffers, m._modules)]
        self.tensors = [t for m in modules for c in (m._parameters, m._buffers) for t in c.values() if t is not None]
        self.members = self._members()
        self.states = self._states()

    def _members(self) -> list[int]:
        return [id(member) for container in self.containers for member in container.values()]

    def _states(self) -> list[tuple[int, torch.dtype, torch.Size]]:
        return [(t._version, t.dtype, t.shape) for t in self.tensors]

    def unchanged(self) -> bool:
        """No parameter, buffer or submodule was added, removed or replaced, and none of the tensors was written
        in place, cast or resized (`.data = ...` keeps the identity but changes the dtype / shape)."""
        return self._members() == self.members and self._states() == self.states


class WeightWatch:
    """Tells, once per forward, whether the model's weights changed since the calling thread last looked."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._seen = threading.local()  # per thread: the epoch its cached state was computed in
        self.epoch = 0  # bumped on every detected change
        self._layout = _Layout(model)
        self._find_adapters()
        self._adapters = self._adapter_states()
        self._adapter_norms = self._norms()

    def _find_adapters(self) -> None:
        """The tuner layers and their weights: they change only with the set of parameters."""
        self._tuner_layers = [module for module in self.model.modules() if _is_tuner_layer(module)]
        self._adapter_weights = [
            param
            for layer in self._tuner_layers
            for name in _ADAPTER_WEIGHTS
            if isinstance(container := getattr(layer, name, None), (torch.nn.ModuleDict, torch.nn.ParameterDict))
            for param in container.parameters()
            if param.numel()
        ]

    def _adapter_states(self) -> tuple[_AdapterState, ...]:
        return tuple(_adapter_state(layer) for layer in self._tuner_layers)

    def _norms(self) -> torch.Tensor | None:
        if not self._adapter_weights:
            return None
        with torch.no_grad():
            return torch.stack(torch._foreach_norm(self._adapter_weights)).double().cpu()

    def _poll(self) -> None:
        """Compare the model with the last signature; a difference starts a new epoch."""
        moved = not self._layout.unchanged()
        if moved:
            self._layout = _Layout(self.model)
            self._find_adapters()
        adapters = self._adapter_states()
        norms = self._norms()
        if moved or adapters != self._adapters or not _same(norms, self._adapter_norms):
            self._adapters, self._adapter_norms = adapters, norms
            self.epoch += 1

    def changed(self) -> bool:
        """True once per thread after a change: that thread's cached features were computed with old weights."""
        with self._lock:
            self._poll()
            epoch = self.epoch
        seen = getattr(self._seen, "epoch", 0)
        self._seen.epoch = epoch
        return seen != epoch
