"""MixCache (paper 001): adaptive hybrid caching at step, CFG and block granularity.

Per step (both CFG branches share one decision, taken by the first forward of the step):

- warm-up: compute fully while D_step (relative L1 between consecutive outputs) >= theta;
- cache-enabled phase: every N-th step is computed fully (cnt = (cnt + 1) % N); after each full step the
  interval N is rescaled from D_full (relative L1 to the previous full step, per step of distance) against
  delta1 / delta2: N_acc in {4, 3, 2}, N_eff in {5, 4, 3};
- the other steps use the granularity with the smallest P = D * I, where D is the latest measured
  redundancy of that granularity and I its offline impact (Gaussian perturbation); with the penalty the
  granularity used at the previous step is not allowed again:
  * step: both branches reuse their previous output;
  * cfg: the conditional branch is computed, the unconditional one is cond + cached (uncond - cond);
  * block i: the conditional branch takes its previous output of block i as the input of block i + 1 and
    computes only the later blocks; the unconditional branch is cond + cached difference.

theta, delta1, delta2 and the impacts come from `ditcache calibrate mixcache` (a JSON profile tied to the
model and step count). Our reading of two points the paper leaves open: D values can only be measured on
what was computed, so each D is the latest measurement, divided by the number of steps it spans; and a
model that runs no unconditional branch (guidance-distilled, or CFG batched into one forward) has the CFG
granularity disabled (said once with a warning) and block mode then applies to the whole batch.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ..calibration.profiles import Profile, find_profile
from ..config import PolicyConfig, check_bool, check_choice, check_int
from ..engine.calls import BlockCall, ForwardCall, sample_of
from ..registry import register_policy, register_preset
from .base import Policy, is_finite

METHOD = "mixcache"
GRANULARITIES = ("step", "cfg", "block")
INTERVALS = {"acc": (4, 3, 2), "eff": (5, 4, 3)}  # N for D_full < delta1, < delta2, >= delta2


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


@dataclasses.dataclass(frozen=True)
class MixCacheConfig(PolicyConfig):
    mode: str = "acc"  # "acc": N in {4, 3, 2}; "eff": N in {5, 4, 3}
    profile: str | None = None  # profile JSON path; None = the shipped profile matching model and steps
    granularities: tuple[str, ...] = GRANULARITIES
    penalty: bool = True  # never the same granularity at two consecutive cache-enabled steps
    adaptive_interval: bool = True  # False: N stays `fixed_interval`
    fixed_interval: int = 4

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, tuple(INTERVALS))
        if self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"profile must be None or a path string, got {self.profile!r}")
        if not isinstance(self.granularities, tuple) or not self.granularities:
            raise ValueError(f"granularities must be a non-empty tuple of {GRANULARITIES}, got {self.granularities!r}")
        for g in self.granularities:
            check_choice("granularities[...]", g, GRANULARITIES)
        check_bool("penalty", self.penalty)
        check_bool("adaptive_interval", self.adaptive_interval)
        check_int("fixed_interval", self.fixed_interval, 2, 50)


@dataclasses.dataclass
class MixCacheController:
    """The step-level decisions of Algorithm 1 from measured D values (no tensors)."""

    theta: float
    delta1: float
    delta2: float
    impact_step: float
    impact_cfg: float
    impact_block: dict[int, list[float]]  # block position -> impact per step
    intervals: tuple[int, int, int]
    granularities: tuple[str, ...]
    penalty: bool = True
    adaptive_interval: bool = True
    fixed_interval: int = 4
    phase: str = "warmup"
    cnt: int = 0
    interval: int = 0
    next_mode: str | None = None
    last_mode: str | None = None
    d: dict[str, float] = dataclasses.field(default_factory=dict)  # "step", "cfg", "block:<pos>"

    def __post_init__(self) -> None:
        self.interval = self.intervals[1] if self.adaptive_interval else self.fixed_interval

    def decide(self, step: int) -> str:
        """ "full", "step", "cfg" or "block:<pos>" for this step."""
        if self.phase == "warmup":
            if "step" in self.d and self.d["step"] < self.theta:
                self.phase = "cache"
                self.cnt = 0
                self.next_mode = self.choose(step)
            else:
                return "full"
        self.cnt = (self.cnt + 1) % self.interval
        if self.cnt == 0 or self.next_mode is None:
            return "full"
        mode, self.last_mode = self.next_mode, self.next_mode
        self.next_mode = self.choose(step + 1)
        return mode

    def full_step_done(self, d_full: float | None) -> None:
        """Rescale N after a full computation in the cache-enabled phase (Eq. 6)."""
        if self.phase != "cache" or d_full is None or not self.adaptive_interval:
            return
        low, mid, high = self.intervals
        self.interval = low if d_full < self.delta1 else mid if d_full < self.delta2 else high
        self.next_mode = self.choose(None)

    def choose(self, step: int | None) -> str | None:
        scores = {}
        for key, value in self.d.items():
            if key == "step" and "step" in self.granularities:
                scores["step"] = value * self.impact_step
            elif key == "cfg" and "cfg" in self.granularities:
                scores["cfg"] = value * self.impact_cfg
            elif key.startswith("block:") and "block" in self.granularities:
                impacts = self.impact_block.get(int(key[6:]))
                if impacts:
                    index = min(step if step is not None else len(impacts) - 1, len(impacts) - 1)
                    scores[key] = value * impacts[index]
        if self.penalty and self.last_mode in scores and len(scores) > 1:
            del scores[self.last_mode]
        return min(scores, key=scores.get) if scores else None


@register_policy(MixCacheConfig)
class MixCachePolicy(Policy):
    uses_block_hooks = True

    def __init__(self, config: MixCacheConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self._given = Profile.load(config.profile) if config.profile else None
        self._warned_no_cfg = False
        self.reset()

    def reset(self) -> None:
        self.controller: MixCacheController | None = None
        self.num_steps: int | None = None
        self.decisions: dict[int, str] = {}
        self.cond_output: dict[int, torch.Tensor] = {}  # step -> cond output (for the uncond branch)
        self.delta_cfg: torch.Tensor | None = None
        self.branches_seen: set[str] = set()
        self.trace: list[tuple[int, str]] = []

    def new_branch_state(self) -> dict[str, Any]:
        return {"output": None, "output_step": None, "full": None, "full_step": None, "blocks": {}, "mode": "full"}

    def _prepare(self, call: ForwardCall) -> None:
        num_steps = call.info.num_steps
        if num_steps is None:
            raise ValueError("MixCache needs the number of steps: use a pipeline or handle.generation(num_steps=...)")
        if self.controller is not None and self.num_steps == num_steps:
            return
        model = self.engine.model
        profile = self._given or find_profile(METHOD, model, num_steps)
        profile.check(METHOD, model, num_steps)
        data, config = profile.data, self.config
        self.controller = MixCacheController(
            theta=data["theta"],
            delta1=data["delta1"],
            delta2=data["delta2"],
            impact_step=data["impact_step"],
            impact_cfg=data["impact_cfg"],
            impact_block={int(k): v for k, v in data["impact_block"].items()},
            intervals=INTERVALS[config.mode],
            granularities=config.granularities,
            penalty=config.penalty,
            adaptive_interval=config.adaptive_interval,
            fixed_interval=config.fixed_interval,
        )
        self.num_steps = num_steps

    @property
    def block_positions(self) -> list[int]:
        return sorted(self.controller.impact_block) if self.controller else []

    # ------------------------------------------------------------------ forward
    def forward(self, call: ForwardCall) -> Any:
        self._prepare(call)
        step, branch, state = call.info.step, call.info.branch, call.state
        self.branches_seen.add(branch)
        if step not in self.decisions:
            if "uncond" not in self.branches_seen and step > 1 and not self._warned_no_cfg:
                warnings.warn(
                    "MixCache: no separate unconditional branch seen; the CFG granularity is disabled", stacklevel=2
                )
                self._warned_no_cfg = True
            if self._warned_no_cfg:
                self.controller.granularities = tuple(g for g in self.controller.granularities if g != "cfg")
            self.decisions[step] = self.controller.decide(step)
            self.trace.append((step, self.decisions[step]))
        mode = self.decisions[step]
        if mode == "step" and state["output"] is not None:
            return call.reuse(state["output"])
        if branch == "uncond" and mode != "full" and step in self.cond_output and self.delta_cfg is not None:
            return call.reuse(self.cond_output[step] + self.delta_cfg)
        state["mode"] = mode if mode.startswith("block:") else "full"
        output = call.run()
        sample = sample_of(output)
        if not is_finite(sample):
            call.record.nonfinite = True
            return output
        self._measure(call, sample, mode)
        return output

    def _measure(self, call: ForwardCall, sample: torch.Tensor, mode: str) -> None:
        step, branch, state = call.info.step, call.info.branch, call.state
        controller = self.controller
        if state["output"] is not None and branch != "uncond":
            controller.d["step"] = rel_l1(sample, state["output"]) / max(1, step - state["output_step"])
        if mode == "full" and branch != "uncond":
            d_full = None
            if state["full"] is not None:
                d_full = rel_l1(sample, state["full"]) / max(1, step - state["full_step"])
            state["full"], state["full_step"] = sample, step
            controller.full_step_done(d_full)
        if branch == "cond":
            self.cond_output = {step: sample}
        elif branch == "uncond" and step in self.cond_output:
            cond = self.cond_output[step]
            controller.d["cfg"] = rel_l1(sample, cond)
            self.delta_cfg = sample - cond
        state["output"], state["output_step"] = sample, step

    # ------------------------------------------------------------------ blocks
    def block(self, call: BlockCall) -> Any:
        state = call.forward.state
        position = call.ref.position
        if state["mode"].startswith("block:"):
            target = int(state["mode"][6:])
            if position < target:
                return call.passthrough()
            if position == target and position in state["blocks"]:
                return call.replace(state["blocks"][position][1])
        output = call.run()
        if position in self.block_positions:
            values = call.outputs_of(output)
            previous = state["blocks"].get(position)
            if previous is not None and call.forward.info.branch != "uncond":
                step, old = previous
                gap = max(1, call.forward.info.step - step)
                self.controller.d[f"block:{position}"] = rel_l1(values["hidden_states"], old["hidden_states"]) / gap
            state["blocks"][position] = (call.forward.info.step, values)
        return output

    def cached_tensors(self) -> Any:
        return {"cond": self.cond_output, "delta_cfg": self.delta_cfg}


register_preset(
    "mixcache-acc",
    lambda: MixCacheConfig(mode="acc"),
    "MixCache: hybrid step/CFG/block caching, accuracy-first intervals 4/3/2 (shipped profile)",
)
register_preset(
    "mixcache-eff",
    lambda: MixCacheConfig(mode="eff"),
    "MixCache: hybrid step/CFG/block caching, efficiency-first intervals 5/4/3 (shipped profile)",
)
