"""MixCache's decision logic (paper 001, Algorithm 1) as plain data: no tensors, no model.

The policy (`mixcache.py`) measures redundancies D on what it computes and hands them here; the controller
says what each step does: compute fully, or reuse at step, CFG or block granularity.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from ..calibration.profiles import ProfileMismatchError


class Granularity(enum.Enum):
    FULL = "full"  # compute the step
    STEP = "step"  # both branches reuse their previous output
    CFG = "cfg"  # cond computed, uncond = cond + cached (uncond - cond)
    BLOCK = "block"  # cond reuses one block's previous output and computes the blocks after it


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one step does; `block` is the reused block's position for `Granularity.BLOCK`."""

    granularity: Granularity
    block: int | None = None

    def __str__(self) -> str:
        return f"block:{self.block}" if self.granularity is Granularity.BLOCK else self.granularity.value


FULL, STEP, CFG = Choice(Granularity.FULL), Choice(Granularity.STEP), Choice(Granularity.CFG)


def block_choice(position: int) -> Choice:
    return Choice(Granularity.BLOCK, position)


class Phase(enum.Enum):
    WARMUP = "warmup"  # compute fully until D_step < theta
    CACHE = "cache"  # every N-th step full, the others reuse


@dataclasses.dataclass(frozen=True)
class MixCacheProfileData:
    """The offline-profiled numbers MixCache needs, validated when a profile is loaded."""

    theta: float
    delta1: float
    delta2: float
    impact_step: float
    impact_cfg: float
    impact_block: dict[int, list[float]]  # block position -> impact per step

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixCacheProfileData:
        scalars = {}
        for name in ("theta", "delta1", "delta2", "impact_step", "impact_cfg"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ProfileMismatchError(f"MixCache profile field {name!r} must be a finite number, got {value!r}")
            scalars[name] = float(value)
        blocks = data.get("impact_block")
        if not isinstance(blocks, dict):
            raise ProfileMismatchError("MixCache profile field 'impact_block' must map block positions to lists")
        impact_block = {}
        for key, impacts in blocks.items():
            if (
                not str(key).isdigit()
                or not isinstance(impacts, list)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in impacts)
            ):
                raise ProfileMismatchError(f"MixCache profile impact_block[{key!r}] must be a list of finite numbers")
            impact_block[int(key)] = [float(v) for v in impacts]
        return cls(**scalars, impact_block=impact_block)


@dataclasses.dataclass
class MixCacheController:
    """The step-level decisions of Algorithm 1 from measured D values."""

    profile: MixCacheProfileData
    intervals: tuple[int, int, int]  # N for D_full < delta1, < delta2, >= delta2
    granularities: frozenset[Granularity]
    penalty: bool = True
    adaptive_interval: bool = True
    fixed_interval: int = 4
    phase: Phase = Phase.WARMUP
    cnt: int = 0
    interval: int = 0
    next_choice: Choice | None = None
    last_choice: Choice | None = None
    d: dict[Choice, float] = dataclasses.field(default_factory=dict)  # latest D per reusable choice

    def __post_init__(self) -> None:
        self.interval = self.intervals[1] if self.adaptive_interval else self.fixed_interval

    def decide(self, step: int) -> Choice:
        """What `step` does."""
        if self.phase is Phase.WARMUP:
            if STEP in self.d and self.d[STEP] < self.profile.theta:
                self.phase = Phase.CACHE
                self.cnt = 0
                self.next_choice = self.choose(step)
            else:
                return FULL
        self.cnt = (self.cnt + 1) % self.interval
        if self.cnt == 0 or self.next_choice is None:
            return FULL
        choice, self.last_choice = self.next_choice, self.next_choice
        self.next_choice = self.choose(step + 1)
        return choice

    def full_step_done(self, d_full: float | None) -> None:
        """Rescale N after a full computation in the cache-enabled phase (Eq. 6)."""
        if self.phase is not Phase.CACHE or d_full is None or not self.adaptive_interval:
            return
        low, mid, high = self.intervals
        self.interval = low if d_full < self.profile.delta1 else mid if d_full < self.profile.delta2 else high
        self.next_choice = self.choose(None)

    def impact(self, choice: Choice, step: int | None) -> float | None:
        """Offline impact I of a choice at a step (None: not allowed or unknown)."""
        if choice.granularity not in self.granularities:
            return None
        if choice.granularity is Granularity.STEP:
            return self.profile.impact_step
        if choice.granularity is Granularity.CFG:
            return self.profile.impact_cfg
        impacts = self.profile.impact_block.get(choice.block)
        if not impacts:
            return None
        return impacts[min(step if step is not None else len(impacts) - 1, len(impacts) - 1)]

    def choose(self, step: int | None) -> Choice | None:
        """The reusable choice with the smallest P = D x I; with the penalty, not the last one used."""
        scores = {}
        for choice, value in self.d.items():
            impact = self.impact(choice, step)
            if impact is not None and math.isfinite(value * impact):  # an unknown (NaN / inf) D never reuses
                scores[choice] = value * impact
        if self.penalty and self.last_choice in scores and len(scores) > 1:
            del scores[self.last_choice]
        return min(scores, key=scores.get) if scores else None
