"""`CacheHandle`: what `ditcache.apply` returns."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..config import PolicyConfig
from .engine import Engine
from .position_memo import MemoCounts
from .state import BranchState
from .stats import ForwardRecord, GenerationStats, Stats

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
        """The policy instance driving this model in the calling thread (its traces and controllers are public
        for analysis); the one `apply` made when this thread has not run the model. Each thread that runs the
        model gets its own instance (docs/PRODUCTION.md)."""
        return self._engine.session_policy()

    @property
    def recorded_generations(self) -> int:
        """How many of the most recent generations keep their per-forward records (default 16); older ones are
        dropped, and `stats()` says how many (`dropped_generations`, `dropped_forwards`)."""
        return self._engine.record_log.limit

    @recorded_generations.setter
    def recorded_generations(self, limit: int) -> None:
        self._engine.record_log.set_limit(limit)

    @property
    def active(self) -> bool:
        return not self._engine.removed

    def remove(self) -> None:
        """Detach every hook; the model behaves exactly as before `apply`. Safe to call twice."""
        self._engine.remove()

    def reset(self) -> None:
        """Forget the calling thread's cached tensors and all statistics; this thread's next forward starts a new
        generation (other threads' generations go on; each new generation starts clean anyway)."""
        self._require_active("reset")
        self._engine.reset()
        self._engine.clear_records()

    def stats(self) -> Stats:
        """Statistics of the recorded generations since apply/reset, all threads (MACs are measured lazily,
        here); generations older than `recorded_generations` are dropped and counted."""
        return self._engine.stats()

    def position_tables(self) -> dict[str, MemoCounts]:
        """Per memoized rotary module (`ModelAdapter.position_tables`, e.g. Flux's "pos_embed"): how often its
        tables were computed (`misses`) and handed back (`hits`) since apply; a copy."""
        return {memo.spec.attr: dataclasses.replace(memo.counts) for memo in self._engine.position_memos}

    def records(self) -> list[ForwardRecord]:
        """Per-forward records of the recorded generations (what stats are computed from), oldest first; a copy."""
        return self._engine.records()

    def branch_state(self, branch: str) -> BranchState:
        """The policy's state of one branch ("cond", "uncond" or "default") in the calling thread's generation."""
        return self._engine.branch_state(branch)

    @contextlib.contextmanager
    def generation(self, num_steps: int | None = None) -> Iterator[CacheHandle]:
        """Explicit generation scope for hand-written sampling loops: starts from clean state (in the calling
        thread: run the loop in the thread that opens the scope)."""
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


class PipelineCacheHandle:
    """One handle over the cached transformers of a pipeline with several (Wan 2.2: `transformer` for high
    noise, `transformer_2` for low noise, switched at a boundary timestep).

    Each transformer has its own engine, policy, per-branch state and statistics, so a step that switches
    experts never reads the other expert's cache. `handles` (or `handle["transformer_2"]`) gives each one's
    `CacheHandle`; `remove()`, `reset()`, `generation()` and `branch()` act on all; `stats()` adds up each
    transformer's last generations (per transformer: `stats_per_model()`).
    """

    def __init__(self, handles: dict[str, CacheHandle], config: PolicyConfig) -> None:
        self.handles = dict(handles)
        self.config = config

    def __getitem__(self, name: str) -> CacheHandle:
        return self.handles[name]

    @property
    def model(self) -> torch.nn.Module:
        """The first cached transformer (`handles[name].model` for the others)."""
        return next(iter(self.handles.values())).model

    @property
    def policy(self) -> Policy:
        """The first transformer's policy (`handles[name].policy` for the others)."""
        return next(iter(self.handles.values())).policy

    @property
    def active(self) -> bool:
        return any(handle.active for handle in self.handles.values())

    def remove(self) -> None:
        """Detach every hook of every transformer; each behaves exactly as before `apply`. Safe to call twice."""
        for handle in reversed(list(self.handles.values())):
            handle.remove()

    def reset(self) -> None:
        for handle in self.handles.values():
            handle.reset()

    @property
    def recorded_generations(self) -> int:
        """How many recent generations each transformer keeps per-forward records of (see `CacheHandle`)."""
        return next(iter(self.handles.values())).recorded_generations

    @recorded_generations.setter
    def recorded_generations(self, limit: int) -> None:
        for handle in self.handles.values():
            handle.recorded_generations = limit

    def stats_per_model(self) -> dict[str, Stats]:
        """Each transformer's own statistics, by pipeline attribute name."""
        return {name: handle.stats() for name, handle in self.handles.items()}

    def stats(self) -> Stats:
        """The transformers' statistics added up, generation by generation (the i-th generation each one saw;
        a transformer that did not run in a generation adds nothing to it)."""
        per_model = [handle.stats() for handle in self.handles.values()]
        count = max((len(stats.generations) for stats in per_model), default=0)
        generations = []
        for i in range(count):
            parts = [stats.generations[i] for stats in per_model if i < len(stats.generations)]
            generations.append(merge_generation_stats(parts))
        return Stats(
            policy=per_model[0].policy if per_model else "",
            generations=generations,
            cache_bytes=sum(stats.cache_bytes for stats in per_model),
            dropped_generations=max((stats.dropped_generations for stats in per_model), default=0),
            dropped_forwards=sum(stats.dropped_forwards for stats in per_model),
        )

    def records(self) -> list[ForwardRecord]:
        """Every transformer's records, transformer by transformer (`handles[name].records()` for one)."""
        return [record for handle in self.handles.values() for record in handle.records()]

    def branch_state(self, branch: str) -> BranchState:
        raise TypeError(
            f"a pipeline handle caches {', '.join(self.handles)}: use handle[name].branch_state({branch!r})"
        )

    @contextlib.contextmanager
    def generation(self, num_steps: int | None = None) -> Iterator[PipelineCacheHandle]:
        with contextlib.ExitStack() as stack:
            for handle in self.handles.values():
                stack.enter_context(handle.generation(num_steps))
            yield self

    @contextlib.contextmanager
    def branch(self, name: str, step_index: int | None = None, **hints: Any) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for handle in self.handles.values():
                stack.enter_context(handle.branch(name, step_index=step_index, **hints))
            yield

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PipelineCacheHandle({', '.join(self.handles)}, {self.config!r}, {state})"


def merge_generation_stats(parts: list[GenerationStats]) -> GenerationStats:
    """Several models' statistics of one generation as one (counts and MACs added, per-forward lists joined)."""
    first = parts[0]
    blocks = sum(g.blocks_total * g.forwards for g in parts)
    same_blocks = all(len(g.block_tokens) == len(first.block_tokens) for g in parts)
    return GenerationStats(
        generation=first.generation,
        forwards=sum(g.forwards for g in parts),
        steps=sum(g.steps for g in parts),
        computed_forwards=sum(g.computed_forwards for g in parts),
        reused_forwards=sum(g.reused_forwards for g in parts),
        reused=sorted(item for g in parts for item in g.reused),
        blocks_computed=[b for g in parts for b in g.blocks_computed],
        blocks_total=max(g.blocks_total for g in parts),
        token_fraction=sum(g.token_fraction * g.blocks_total * g.forwards for g in parts) / max(1, blocks),
        block_tokens=(
            [sum(values) for values in zip(*(g.block_tokens for g in parts))]
            if same_blocks
            else [t for g in parts for t in g.block_tokens]
        ),
        trial_forwards=sum(g.trial_forwards for g in parts),
        partial_batch_forwards=sum(g.partial_batch_forwards for g in parts),
        macs_full=sum(g.macs_full for g in parts),
        macs_executed=sum(g.macs_executed for g in parts),
        decide_seconds=sum(g.decide_seconds for g in parts),
        nonfinite_events=sum(g.nonfinite_events for g in parts),
    )
