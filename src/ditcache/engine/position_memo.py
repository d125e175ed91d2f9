"""Rotary tables computed once per input instead of at every forward (`ModelAdapter.position_tables`).

Flux's `pos_embed(ids)`, Wan's and HunyuanVideo's `rope(hidden_states)` rebuild the same cos / sin tables at
every forward from the positions alone: a few dozen small ops that any step pays, a reused one too (on
ref-image 0.5 of the 2.6 ms a step with every block reused costs). While ditcache is applied the module's
forward is hooked: the first call with an input computes the tables, later calls with the same input get the
same tensors back. The input is compared by shape, dtype and device for every tensor argument, by value for
the adapter's `by_value` arguments (position ids), by equality for the rest. Position ids on an accelerator
are not compared (`torch.equal` would be a second host sync per forward): there Flux-class tables are computed
as without ditcache, and only the shape-keyed ones (Wan, HunyuanVideo, ...) are memoized.

Never handed back: tables written in place since (their `_version` moved), inference-mode tables (they keep
no write counter), tables that require grad, tables from before a weight change (`WeightWatch.epoch`: a
rotary module keeps its frequencies as buffers). The tables are the ones the module computed, so the output
is bit-identical to the unhooked model's.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..adapters.base import PositionTable
from .binding import BoundCall

# Flux 2 asks for its image and its text ids every forward; a few resolutions may alternate.
MAX_ENTRIES = 4


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: tuple[Hashable, ...]  # every argument: tensors as (shape, dtype, device), others as themselves
    values: tuple[torch.Tensor, ...]  # copies of the `by_value` tensors
    output: Any
    tables: tuple[torch.Tensor, ...]  # the output's tensors
    versions: tuple[int, ...]  # their write counters when computed
    epoch: int  # the weights' epoch when computed

    def serves(self, key: tuple[Hashable, ...], values: tuple[torch.Tensor, ...], epoch: int) -> bool:
        return (
            self.key == key
            and self.epoch == epoch
            and all(torch.equal(kept, value) for kept, value in zip(self.values, values, strict=True))
            and all(t._version == v for t, v in zip(self.tables, self.versions, strict=True))
        )


@dataclasses.dataclass
class MemoCounts:
    """How often the tables were computed (`misses`) and handed back (`hits`)."""

    hits: int = 0
    misses: int = 0


class PositionMemo:
    """The memo of one rotary module; `forward` is its `ForwardHook` handler."""

    def __init__(self, module: torch.nn.Module, spec: PositionTable, epoch: Callable[[], int]) -> None:
        self.module, self.spec, self._epoch = module, spec, epoch
        self._entries: tuple[_Entry, ...] = ()
        self._lock = threading.Lock()
        self.counts = MemoCounts()

    def forward(self, original: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        summary = self._summary(BoundCall(type(self.module), args, kwargs).passed)
        if summary is None:
            return original(*args, **kwargs)
        key, values = summary
        epoch = self._epoch()
        for entry in self._entries:
            if entry.serves(key, values, epoch):
                self.counts.hits += 1
                return entry.output
        output = original(*args, **kwargs)
        self.counts.misses += 1
        tables = _tensors(output)
        if tables and not any(t.requires_grad or t.is_inference() for t in tables):
            versions = tuple(t._version for t in tables)
            entry = _Entry(key, tuple(v.clone() for v in values), output, tables, versions, epoch)
            with self._lock:
                self._entries = (entry, *self._entries)[:MAX_ENTRIES]
        return output

    def clear(self) -> None:
        with self._lock:
            self._entries = ()

    def _summary(self, passed: dict[str, Any]) -> tuple[tuple[Hashable, ...], tuple[torch.Tensor, ...]] | None:
        """(key, by-value tensors) of one call; None when an argument cannot be compared (never memoized)."""
        key: list[Hashable] = []
        values: list[torch.Tensor] = []
        for name, value in sorted(passed.items()):
            if isinstance(value, torch.Tensor):
                key.append((name, tuple(value.shape), value.dtype, value.device))
                if name in self.spec.by_value:
                    if value.device.type != "cpu":
                        return None  # comparing accelerator values would cost a host sync per forward
                    values.append(value)
            elif _plain(value):
                key.append((name, value))
            else:
                return None
        return tuple(key), tuple(values)


def _plain(value: Any) -> bool:
    """A value `==` compares by content: numbers, strings, devices, dtypes, None, and tuples of them."""
    if isinstance(value, tuple):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.device, torch.dtype))


def _tensors(output: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors of a tensor or a (nested) tuple / list of tensors; None for anything else."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, (tuple, list)):
        parts = [_tensors(item) for item in output]
        if all(part is not None for part in parts):
            return tuple(t for part in parts for t in part)
    return None
