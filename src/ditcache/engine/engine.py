"""The engine: owns the hooks, the per-branch state and the records of one cached model."""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..adapters import ModelAdapter
from .binding import BoundCall
from .calls import BlockCall, BlockRef, ForwardCall, SubmoduleCall, SubmoduleRef, shape_key
from .context import StepTracker
from .decisions import DecisionSync, context_parallel_config, decision_group
from .hooks import AttributeOverride, ForwardHook
from .macs import CostTable, measure_costs
from .position_memo import PositionMemo
from .session import Session, SessionPool
from .state import BranchState
from .stats import REUSED, ForwardRecord, GenerationStats, RecordLog, Stats, tensor_bytes
from .view import ModelView
from .weights import WeightWatch

if TYPE_CHECKING:
    from ..policies.base import Policy

ENGINE_ATTR = "_ditcache_engine"


def _timestep_value(timestep: Any) -> float:
    if timestep is None:
        raise ValueError("the model was called without a timestep; ditcache needs it to locate the sampling step")
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().float().max())
    return float(timestep)


class Engine:
    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, policy: Policy, scheduler: Any = None) -> None:
        # `policy` is the first session's; other threads get their own instance (`engine/session.py`).
        self.model, self.adapter, self.policy, self.scheduler = model, adapter, policy, scheduler
        self.blocks = self._find_blocks()
        self.submodules = self._find_submodules()
        self.hooks_blocks = policy.uses_block_hooks
        self._generation_ids = itertools.count(1).__next__  # shared: generations of all threads differ
        self._lock = threading.RLock()  # guards the records and the MACs tables
        self._log = RecordLog()
        self._examples: dict[tuple, dict[str, Any]] = {}
        self._costs: dict[tuple, CostTable] = {}
        self._block_examples: dict[tuple, tuple[torch.nn.Module, tuple, dict]] = {}
        self._block_costs: dict[tuple, int] = {}
        self._hooks: list[ForwardHook] = []
        self._overrides: list[AttributeOverride] = []
        self.removed = False
        self.view = ModelView(model, adapter, tuple(self.blocks), tuple(self.submodules))
        policy.bind(self.view)
        self._sessions = SessionPool(self._new_session, policy)
        self.weights = WeightWatch(model)  # LoRA load / fuse / unload: cached features go stale
        self.position_memos = [
            PositionMemo(self._position_module(spec.attr), spec, lambda: self.weights.epoch)
            for spec in adapter.position_tables
        ]
        # Context parallelism: block statistics are shards, reduced through one choke point (engine/decisions.py).
        self.context_parallel = context_parallel_config(model)
        self.decisions = DecisionSync(decision_group(model))

    # ----------------------------------------------------------------- install / remove
    def _find_blocks(self) -> list[BlockRef]:
        """Every hooked block, `position` in the order the model calls them (the adapter's execution order)."""
        lists = []
        for spec in self.adapter.block_lists:
            blocks = getattr(self.model, spec.attr, None)
            if not isinstance(blocks, torch.nn.ModuleList):
                raise TypeError(f"{type(self.model).__name__}.{spec.attr} is not an nn.ModuleList; fix the adapter")
            lists.append([(spec, index, block) for index, block in enumerate(blocks)])
        if self.adapter.execution_order == "interleaved":
            order = [item for row in itertools.zip_longest(*lists) for item in row if item is not None]
        else:
            order = [item for blocks in lists for item in blocks]
        return [
            BlockRef(spec, index, position, f"{spec.attr}.{index}", block)
            for position, (spec, index, block) in enumerate(order)
        ]

    def _position_module(self, attr: str) -> torch.nn.Module:
        module = getattr(self.model, attr, None)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{type(self.model).__name__}.{attr} is not a module (a position table); fix the adapter")
        return module

    def _find_submodules(self) -> list[SubmoduleRef]:
        refs = []
        for block in self.blocks:
            for role, attrs in (("attention", block.spec.attention), ("mlp", block.spec.mlp)):
                for attr in attrs:
                    if isinstance(getattr(block.module, attr, None), torch.nn.Module):
                        refs.append(SubmoduleRef(block, role, attr))
        return refs

    def install(self) -> None:
        if getattr(self.model, ENGINE_ATTR, None) is not None:
            raise RuntimeError(
                f"ditcache is already applied to this {type(self.model).__name__}; call handle.remove() first"
            )
        self._overrides.append(AttributeOverride(self.model, ENGINE_ATTR, self))
        # Under diffusers' context parallelism the model-level hook wraps the split: it sees (and caches) the
        # whole latent and the gathered output, identical on every rank; blocks see this rank's shard.
        self._hooks.append(ForwardHook(self.model, self._model_forward, outermost=self.context_parallel is not None))
        if self.hooks_blocks:
            for ref in self.blocks:
                self._hooks.append(ForwardHook(ref.module, functools.partial(self._block_forward, ref)))
        if self.policy.uses_submodule_hooks:
            for sub in self.submodules:
                module = getattr(sub.block.module, sub.attr)
                self._hooks.append(ForwardHook(module, functools.partial(self._submodule_forward, sub)))
        for memo in self.position_memos:
            self._hooks.append(ForwardHook(memo.module, functools.partial(self._position_forward, memo)))
        original_cache_context = getattr(self.model, "cache_context", None)
        if original_cache_context is not None:

            @contextlib.contextmanager
            def cache_context(name: str, **hints: Any) -> Iterator[None]:
                # Keep diffusers' own behaviour (its hooks read the same context) and note the branch for us.
                with original_cache_context(name, **hints), self.branch(name, **hints):
                    yield

            self._overrides.append(AttributeOverride(self.model, "cache_context", cache_context))

    def remove(self) -> None:
        if self.removed:
            return
        for hook in reversed(self._hooks):
            hook.remove()
        for override in reversed(self._overrides):
            override.remove()
        self._hooks.clear()
        self._overrides.clear()
        for session in self._sessions.all():
            session.states.clear()
        for memo in self.position_memos:
            memo.clear()
        self.removed = True

    # ----------------------------------------------------------------- sessions and context
    def _new_session(self, policy: Policy | None) -> Session:
        if policy is None:
            # Another thread: a policy of its own, made as `apply` made the first one.
            policy = type(self.policy)(self.policy.config, self.adapter)
            policy.bind(self.view)
        tracker = StepTracker(self.scheduler, not self.adapter.timesteps_increase, self._generation_ids)
        return Session(tracker, policy)

    def session(self) -> Session:
        """The calling thread's session (made on first use)."""
        return self._sessions.current()

    def session_policy(self) -> Policy:
        """The policy of the calling thread's session, or the first one when this thread has none yet."""
        session = self._sessions.existing()
        return session.policy if session is not None else self.policy

    @contextlib.contextmanager
    def branch(self, name: str, **hints: Any) -> Iterator[None]:
        tracker = self.session().tracker
        saved = tracker.branch_name, tracker.branch_hints
        tracker.branch_name, tracker.branch_hints = name, {k: v for k, v in hints.items() if v is not None}
        try:
            yield
        finally:
            tracker.branch_name, tracker.branch_hints = saved

    def reset(self, num_steps: int | None = None) -> None:
        """A new generation in the calling thread (other threads' generations go on untouched)."""
        session = self.session()
        session.tracker.start_generation(num_steps)
        self._begin_generation(session, session.tracker.generation)

    @staticmethod
    def _begin_generation(session: Session, generation: int | None) -> None:
        session.states.clear()
        session.policy.reset()
        session.active_generation = generation

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        session = self.session()
        session.bypass += 1
        try:
            yield
        finally:
            session.bypass -= 1

    def _new_state(self, policy: Policy) -> BranchState:
        state = policy.new_branch_state()
        if not isinstance(state, BranchState):
            raise TypeError(
                f"{type(policy).__name__}.new_branch_state() must return a ditcache.BranchState dataclass, "
                f"got {type(state).__name__}"
            )
        return state

    def remember_example(self, key: tuple, arguments: dict[str, Any]) -> None:
        with self._lock:
            if key not in self._examples and key not in self._costs:
                self._examples[key] = {**arguments, "return_dict": False}

    def remember_block_example(self, key: tuple, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """A block call at a token-subset shape, measured lazily when stats are asked for."""
        with self._lock:
            if key not in self._block_examples and key not in self._block_costs:
                self._block_examples[key] = (block, args, kwargs)

    # ----------------------------------------------------------------- hooks
    def _model_forward(self, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        session = self.session()
        if session.bypass or session.current is not None:
            return original(*args, **kwargs)
        if context_parallel_config(self.model) is not self.context_parallel:
            raise RuntimeError(
                f"context parallelism of this {type(self.model).__name__} changed after ditcache.apply: enable it "
                "first (transformer.enable_parallelism or ditcache.parallel.enable_context_parallel), then apply"
            )
        if self.weights.changed():  # the weights changed: nothing cached so far may be reused (engine/weights.py)
            self._begin_generation(session, session.active_generation)
        bound = BoundCall(type(self.model), args, kwargs)
        arguments = bound.passed
        timestep = _timestep_value(arguments.get(self.adapter.timestep_arg))
        info, _ = session.tracker.locate(timestep, session.layout.layout(self.adapter, arguments))
        if info.generation != session.active_generation:
            self._begin_generation(session, info.generation)
        state = session.states.get(info.branch)
        if state is None:
            state = session.states[info.branch] = self._new_state(session.policy)
        key = shape_key(arguments)
        self.remember_example(key, arguments)
        record = ForwardRecord(info.generation, info.step, info.branch, key, len(self.blocks))
        call = ForwardCall(self, original, bound, info, state, record)
        session.current = call
        start = time.perf_counter()
        try:
            output = session.policy.forward(call)
        except BaseException:
            # Half-updated state is never reused; retrying the step places it where it was.
            state.reset()
            session.tracker.undo()
            raise
        finally:
            session.current = None
        if not call.finish(output):
            # Never replay NaN / inf: the branch starts over as if new; the policy drops shared state too.
            record.nonfinite = True
            state.reset()
            session.policy.on_nonfinite(call)
        record.decide_seconds = max(0.0, time.perf_counter() - start - record.compute_seconds)
        self._log.append(record)
        return output

    def _block_forward(self, ref: BlockRef, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        session = self.session()
        call = session.current
        if call is None or session.bypass:
            return original(*args, **kwargs)
        return session.policy.block(BlockCall(call, ref, original, args, kwargs))

    def _position_forward(self, memo: PositionMemo, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        # Only inside a forward the engine handles: it has just compared the weights (the memo's epoch).
        session = self.session()
        if session.current is None or session.bypass:
            return original(*args, **kwargs)
        return memo.forward(original, args, kwargs)

    def _submodule_forward(self, ref: SubmoduleRef, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        session = self.session()
        call = session.current
        if call is None or session.bypass:
            return original(*args, **kwargs)
        return session.policy.submodule(SubmoduleCall(call, ref, original, args, kwargs))

    # ----------------------------------------------------------------- stats
    def _cost(self, key: tuple) -> CostTable:
        if key not in self._costs:
            example = self._examples.pop(key)
            with self.bypassed():
                self._costs[key] = measure_costs(
                    lambda: self.model(**example),
                    self.model,
                    [ref.name for ref in self.blocks],
                    [sub.name for sub in self.submodules],
                )
        return self._costs[key]

    def _block_cost(self, key: tuple) -> int:
        if key not in self._block_costs:
            block, args, kwargs = self._block_examples.pop(key)
            # Under context parallelism the example holds shard-local arguments: calling the module would pass
            # them through diffusers' split hooks a second time, so the class forward runs beneath them.
            forward = block if self.context_parallel is None else functools.partial(type(block).forward, block)
            with self.bypassed():
                self._block_costs[key] = measure_costs(lambda: forward(*args, **kwargs), block, []).total
        return self._block_costs[key]

    @property
    def record_log(self) -> RecordLog:
        """The per-forward records kept (the most recent generations, `RecordLog.limit`)."""
        return self._log

    def records(self) -> list[ForwardRecord]:
        return self._log.records()

    def branch_state(self, branch: str) -> BranchState:
        states = self.session().states
        if branch not in states:
            raise KeyError(f"no state for branch {branch!r} in this generation; branches: {sorted(states)}")
        return states[branch]

    def clear_records(self) -> None:
        self._log.clear()

    def stats(self) -> Stats:
        with self._lock:  # MACs tables are filled here; threads may ask at once
            by_generation = self._log.by_generation()
            generations = [self._generation_stats(g, records) for g, records in by_generation.items()]
        # One count per session: a tensor both in a branch state and in the policy's shared state counts once.
        cache_bytes = sum(
            tensor_bytes((session.states, session.policy.cached_tensors())) for session in self._sessions.all()
        )
        return Stats(
            policy=self.policy.describe(),
            generations=generations,
            cache_bytes=cache_bytes,
            dropped_generations=self._log.dropped_generations,
            dropped_forwards=self._log.dropped_forwards,
        )

    def _executed_macs(self, record: ForwardRecord) -> int:
        """Outside-blocks cost per pass, full block runs from the forward's table, token-subset runs from a
        measurement of that block at that shape, minus skipped attention / MLP submodules."""
        cost = self._cost(record.executed_key if record.executed_key is not None else record.shape_key)
        macs = record.passes * cost.outside_blocks
        macs += sum(runs * block for runs, block in zip(record.full_block_runs, cost.blocks))
        macs += sum(self._block_cost(key) for key in record.token_runs)
        return macs - sum(cost.submodules.get(name, 0) for name in record.skipped_submodules)

    def _generation_stats(self, generation: int, records: list[ForwardRecord]) -> GenerationStats:
        macs_full = macs_executed = 0
        token_sum = 0.0
        block_tokens = [0] * len(self.blocks)
        for record in records:
            cost = self._cost(record.shape_key)
            macs_full += cost.total
            if record.kind != REUSED:
                macs_executed += self._executed_macs(record)
            macs_executed += sum(self._cost(key).total for key in record.trial_keys)
            token_sum += sum(record.block_fraction)
            block_tokens = [a + b for a, b in zip(block_tokens, record.block_tokens)]
        reused = [(r.step, r.branch) for r in records if r.kind == REUSED]
        num_blocks = len(self.blocks)
        return GenerationStats(
            generation=generation,
            forwards=len(records),
            steps=len({r.step for r in records}),
            computed_forwards=len(records) - len(reused),
            reused_forwards=len(reused),
            reused=reused,
            blocks_computed=[sum(r.block_fraction) for r in records],
            blocks_total=num_blocks,
            token_fraction=token_sum / max(1, num_blocks * len(records)),
            block_tokens=block_tokens,
            trial_forwards=sum(len(r.trial_keys) for r in records),
            partial_batch_forwards=sum(r.executed_key is not None for r in records),
            macs_full=macs_full,
            macs_executed=macs_executed,
            decide_seconds=sum(r.decide_seconds for r in records),
            nonfinite_events=sum(r.nonfinite for r in records),
        )
