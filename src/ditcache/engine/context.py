"""Where a forward call sits: generation, step index, CFG branch.

Three sources feed it, most explicit first:
1. diffusers' `transformer.cache_context(name, step_index=..., num_inference_steps=...)` (pipelines call it);
2. the explicit API, `handle.generation(num_steps=...)` and `handle.branch(name, step_index=...)`;
3. the timestep passed to the model: sampling walks timesteps downwards, so within one branch a timestep
   that is not lower than the previous one (or a step index that does not grow) starts a new generation.
   This is what makes a second `pipe(...)` call start from clean state without the user doing anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DEFAULT_BRANCH = "default"


@dataclasses.dataclass(frozen=True)
class ForwardInfo:
    """What a policy knows about the forward it is deciding on."""

    generation: int
    step: int  # 0-based index of the sampling step in this generation
    num_steps: int | None  # total steps when known (pipeline, cache_context or explicit API)
    timestep: float  # as passed to the model (Flux passes sigma in [0, 1], Wan and SD3 pass t in [0, 1000])
    branch: str  # "cond", "uncond", or "default" when the caller names none (e.g. batched CFG)


@dataclasses.dataclass
class _BranchCursor:
    last_timestep: float
    last_step: int
    shape: tuple[int, ...]


class StepTracker:
    """Turns (branch, timestep, explicit hints) into a `ForwardInfo`, detecting new generations."""

    def __init__(self, scheduler: Any | None = None, descending: bool = True) -> None:
        self.scheduler = scheduler  # a diffusers scheduler when applied to a pipeline
        # Timesteps fall during sampling (most pipelines); Lumina2 / Z-Image pass 1 - t / 1000, which grows.
        self.descending = descending
        self.generation = 0
        self.branch_name: str | None = None
        self.branch_hints: dict[str, Any] = {}
        self._explicit_num_steps: int | None = None
        self._cursors: dict[str, _BranchCursor] = {}
        self._timesteps: list[float] = []

    def start_generation(self, num_steps: int | None = None) -> None:
        self.generation += 1
        self._explicit_num_steps = num_steps
        self._cursors.clear()
        self._timesteps.clear()

    def locate(self, timestep: float, shape: tuple[int, ...]) -> tuple[ForwardInfo, bool]:
        """Place one forward; returns its info and whether it started a new generation."""
        hinted_step = self.branch_hints.get("step_index")
        branch = self.branch_name or (
            DEFAULT_BRANCH if hinted_step is not None else self._unnamed_branch(timestep, shape)
        )
        cursor = self._cursors.get(branch)
        new_generation = False
        if cursor is not None:
            if hinted_step is not None:
                new_generation = int(hinted_step) <= cursor.last_step
            elif self.descending:
                new_generation = timestep >= cursor.last_timestep
            else:
                new_generation = timestep <= cursor.last_timestep
        if new_generation:
            self.start_generation()
            cursor = None
        elif cursor is not None and cursor.shape != shape:
            raise ValueError(
                f"hidden_states shape changed from {cursor.shape} to {shape} in the middle of a generation "
                f"(branch {branch!r}, step {cursor.last_step + 1}); a new resolution needs a new generation: "
                "start it from the highest timestep or call handle.reset() first"
            )
        step = int(hinted_step) if hinted_step is not None else self._step_from_timestep(timestep)
        self._cursors[branch] = _BranchCursor(timestep, step, shape)
        info = ForwardInfo(self.generation, step, self._num_steps(), timestep, branch)
        return info, new_generation

    def _unnamed_branch(self, timestep: float, shape: tuple[int, ...]) -> str:
        """Pipelines that run CFG as two forwards per step without naming them (Chroma, Lumina2): the n-th
        unnamed forward at one timestep with the same latent shape is branch "default" (n = 1), "default-2", ...;
        so uncond never reads cond's cache, and a repeated timestep is not mistaken for a new generation (a
        latent of another shape at the same timestep still starts one)."""
        n = 1
        while True:
            name = DEFAULT_BRANCH if n == 1 else f"{DEFAULT_BRANCH}-{n}"
            cursor = self._cursors.get(name)
            if cursor is None or not _same_timestep(cursor.last_timestep, timestep) or cursor.shape != shape:
                return name
            n += 1

    def _step_from_timestep(self, timestep: float) -> int:
        # All branches of one step share its timestep; steps are the distinct timesteps, in order.
        for index, seen in enumerate(self._timesteps):
            if _same_timestep(seen, timestep):
                return index
        self._timesteps.append(timestep)
        return len(self._timesteps) - 1

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


def _same_timestep(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))
