"""`CacheHandle`: what `ditcache.apply` returns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..config import PolicyConfig
from .engine import Engine
from .state import BranchState
from .stats import ForwardRecord, Stats

if TYPE_CHECKING:
    from ..policies.base import Policy


class CacheHandle:
    """Controls one cached model: `remove()`, `reset()`, `stats()`, and the explicit context API."""

    def __init__(self, engine: Engine, config: PolicyConfig) -> None:
        self._engine = engine
        self.config = config

    @property
    def model(self) -> torch.nn.Module:
        return self._engine.model

    @property
    def policy(self) -> Policy:
        """The policy instance driving this model (its traces and controllers are public for analysis)."""
        return self._engine.policy

    @property
    def active(self) -> bool:
        return not self._engine.removed

    def remove(self) -> None:
        """Detach every hook; the model behaves exactly as before `apply`. Safe to call twice."""
        self._engine.remove()

    def reset(self) -> None:
        """Forget all cached tensors and statistics; the next forward starts a new generation."""
        self._require_active("reset")
        self._engine.reset()
        self._engine.clear_records()

    def stats(self) -> Stats:
        """Statistics of every generation since apply/reset (MACs are measured lazily, here)."""
        return self._engine.stats()

    def records(self) -> list[ForwardRecord]:
        """Per-forward records since apply/reset (what stats are computed from), oldest first; a copy."""
        return self._engine.records()

    def branch_state(self, branch: str) -> BranchState:
        """The policy's state of one branch ("cond", "uncond" or "default") in the current generation."""
        return self._engine.branch_state(branch)

    @contextlib.contextmanager
    def generation(self, num_steps: int | None = None) -> Iterator[CacheHandle]:
        """Explicit generation scope for hand-written sampling loops: starts from clean state."""
        self._require_active("generation")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        self._engine.reset(num_steps)
        yield self

    def branch(self, name: str, step_index: int | None = None, **hints: Any) -> contextlib.AbstractContextManager:
        """Mark forwards as one CFG branch ("cond"/"uncond"), like diffusers' `cache_context`."""
        self._require_active("branch")
        return self._engine.branch(name, step_index=step_index, **hints)

    def _require_active(self, what: str) -> None:
        if self._engine.removed:
            raise RuntimeError(f"handle.{what}() after handle.remove(): apply the cache again to get a new handle")

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"CacheHandle({type(self.model).__name__}, {self.config!r}, {state})"
