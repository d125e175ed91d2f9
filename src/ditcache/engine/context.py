"""Where a forward call sits: generation, step index, CFG branch.

Three sources feed it, most explicit first:
1. diffusers' `transformer.cache_context(name, step_index=..., num_inference_steps=...)` (pipelines call it);
2. the explicit API, `handle.generation(num_steps=...)` and `handle.branch(name, step_index=...)`;
3. the timestep passed to the model: sampling walks timesteps downwards, so within one branch a timestep
   that rises (or a step index hint that goes back) starts a new generation. This is what makes a second
   `pipe(...)` call start from clean state without the user doing anything.

Every model evaluation of a branch is its own `step`. Samplers that evaluate the model twice per sampler step
(Heun: timesteps t0, t1, t1, t2, t2, ...) or revisit a timestep (a retried step) therefore never restart the
generation: a repeated timestep is the next evaluation, `ForwardInfo.evaluation` counts the branch's earlier
forwards at that timestep, and step-periodic policies reuse at their rate per evaluation. `num_steps` is then
the number of evaluations (`len(scheduler.timesteps)`, which for Heun is 2n - 1).

The scheduler object's own step counter is not read: the pipeline's scheduler may not be the one stepping
(diffusers' server example gives each request a copy through `from_pipe`), and threads share it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from .layout import Layout

DEFAULT_BRANCH = "default"


@dataclasses.dataclass(frozen=True)
class ForwardInfo:
    """What a policy knows about the forward it is deciding on."""

    generation: int
    step: int  # 0-based index of this model evaluation of the branch in this generation
    num_steps: int | None  # total evaluations when known (pipeline, cache_context or explicit API)
    timestep: float  # as passed to the model (Flux passes sigma in [0, 1], Wan and SD3 pass t in [0, 1000])
    branch: str  # "cond", "uncond", or "default" when the caller names none (e.g. batched CFG)
    # Earlier forwards of this branch at the same timestep (or step hint) in this generation: 1 for Heun's
    # second evaluation at a timestep, or a step evaluated again.
    evaluation: int = 0


@dataclasses.dataclass(frozen=True)
class _BranchCursor:
    timestep: float
    step: int
    hinted: int | None  # the step_index hint it came with
    evaluation: int
    layout: Layout  # latent shape and position-id signature (`layout.LayoutProbe`)


@dataclasses.dataclass(frozen=True)
class _UnnamedCount:
    """Unnamed forwards seen at the latest timestep, and how many there were at the generation's first one."""

    timestep: float | None = None
    layout: Layout | None = None
    count: int = 0
    width: int | None = None  # branches per evaluation, fixed once the first timestep is over

    def index(self, timestep: float, layout: Layout) -> int:
        """0 for "default", 1 for "default-2", ...: the n-th unnamed forward at a timestep, modulo the width."""
        if self.timestep is None or not same_timestep(self.timestep, timestep) or self.layout != layout:
            return 0
        return self.count % self.width if self.width else self.count

    def after(self, timestep: float, layout: Layout) -> _UnnamedCount:
        if self.timestep is not None and same_timestep(self.timestep, timestep) and self.layout == layout:
            return dataclasses.replace(self, count=self.count + 1)
        width = self.width if self.width or self.timestep is None else self.count
        return _UnnamedCount(timestep, layout, 1, width)


@dataclasses.dataclass(frozen=True)
class _Undo:
    branch: str
    cursor: _BranchCursor | None
    slots: int
    unnamed: _UnnamedCount


class StepTracker:
    """Turns (branch, timestep, layout, explicit hints) into a `ForwardInfo`, detecting new generations."""

    def __init__(
        self, scheduler: Any | None = None, descending: bool = True, generation_ids: Callable[[], int] | None = None
    ) -> None:
        self.scheduler = scheduler  # a diffusers scheduler when applied to a pipeline (for the step count)
        # Timesteps fall during sampling (most pipelines); Lumina2 / Z-Image pass 1 - t / 1000, which grows.
        self.descending = descending
        # Generation ids come from the engine so that concurrent sessions (threads) never share one.
        self._generation_ids = generation_ids or itertools.count(1).__next__
        self.generation: int | None = None
        self.branch_name: str | None = None
        self.branch_hints: dict[str, Any] = {}
        self._explicit_num_steps: int | None = None
        self._cursors: dict[str, _BranchCursor] = {}
        self._slots: list[float] = []  # the timestep of each step (evaluation slot), in order
        self._unnamed = _UnnamedCount()
        self._undo: _Undo | None = None

    def start_generation(self, num_steps: int | None = None) -> None:
        self.generation = self._generation_ids()
        self._explicit_num_steps = num_steps
        self._cursors.clear()
        self._slots.clear()
        self._unnamed = _UnnamedCount()
        self._undo = None

    def locate(self, timestep: float, layout: Layout) -> tuple[ForwardInfo, bool]:
        """Place one forward; returns its info and whether it started a new generation."""
        hinted = self.branch_hints.get("step_index")
        hinted = None if hinted is None else int(hinted)
        unnamed = self.branch_name is None and hinted is None
        branch = self.branch_name or (DEFAULT_BRANCH if hinted is not None else self._unnamed_branch(timestep, layout))
        cursor = self._cursors.get(branch)
        new_generation = self.generation is None or (
            cursor is not None and self._starts_generation(cursor, timestep, hinted, layout)
        )
        if new_generation:
            self.start_generation()
            cursor = None
        elif cursor is not None and cursor.layout != layout:
            raise ValueError(_layout_change_message(cursor, layout, branch))
        self._undo = _Undo(branch, cursor, len(self._slots), self._unnamed)
        again = cursor is not None and (
            cursor.hinted == hinted if hinted is not None else same_timestep(cursor.timestep, timestep)
        )
        evaluation = cursor.evaluation + 1 if again else 0
        step = hinted if hinted is not None else self._slot(timestep, evaluation)
        self._cursors[branch] = _BranchCursor(timestep, step, hinted, evaluation, layout)
        if unnamed:
            self._unnamed = self._unnamed.after(timestep, layout)
        info = ForwardInfo(self.generation, step, self._num_steps(), timestep, branch, evaluation)
        return info, new_generation

    def undo(self) -> None:
        """Forget the last `locate` (its forward raised): retrying that step gets the same step and branch."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        if undo.cursor is None:
            self._cursors.pop(undo.branch, None)
        else:
            self._cursors[undo.branch] = undo.cursor
        del self._slots[undo.slots :]
        self._unnamed = undo.unnamed

    def _starts_generation(self, cursor: _BranchCursor, timestep: float, hinted: int | None, layout: Layout) -> bool:
        if hinted is not None and cursor.hinted is not None:
            # A step hint that goes back starts over; the same hint again is a retry or a second evaluation.
            return hinted < cursor.hinted or (hinted == cursor.hinted and cursor.layout != layout)
        if same_timestep(cursor.timestep, timestep):
            return cursor.layout != layout  # another latent at the same timestep: a new generation
        rises = timestep > cursor.timestep if self.descending else timestep < cursor.timestep
        return rises

    def _slot(self, timestep: float, evaluation: int) -> int:
        # All branches of one evaluation share its timestep: the k-th evaluation of a branch at a timestep is
        # the k-th step with that timestep, so cond and uncond (or Heun's two evaluations) line up.
        matches = [index for index, seen in enumerate(self._slots) if same_timestep(seen, timestep)]
        if evaluation < len(matches):
            return matches[evaluation]
        self._slots.append(timestep)
        return len(self._slots) - 1

    def _unnamed_branch(self, timestep: float, layout: Layout) -> str:
        """Pipelines that run CFG as two forwards per step without naming them (Chroma, Lumina2): the n-th
        unnamed forward at one timestep with the same layout is branch "default" (n = 1), "default-2", ...;
        so uncond never reads cond's cache. The number of branches is what the generation's first timestep
        had; more forwards at a later timestep (Heun's second evaluation) cycle through the same names."""
        n = self._unnamed.index(timestep, layout) + 1
        return DEFAULT_BRANCH if n == 1 else f"{DEFAULT_BRANCH}-{n}"

    def _num_steps(self) -> int | None:
        hinted = self.branch_hints.get("num_inference_steps")
        if hinted is not None:
            return int(hinted)
        if self._explicit_num_steps is not None:
            return self._explicit_num_steps
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is not None:
            return len(timesteps)
        return None


def _layout_change_message(cursor: _BranchCursor, layout: Layout, branch: str) -> str:
    if cursor.layout[0] != layout[0]:
        change = f"hidden_states shape changed from {cursor.layout[0]} to {layout[0]}"
    else:
        change = f"latent layout (position ids) changed from {cursor.layout[1:]} to {layout[1:]}"
    return (
        f"{change} in the middle of a generation "
        f"(branch {branch!r}, step {cursor.step + 1}); a new resolution or aspect ratio needs a new generation: "
        "start it from the highest timestep or call handle.reset() first"
    )


def same_timestep(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))
