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
from ..numerics import rel_l1
from ..registry import register_policy, register_preset
from .base import Policy, is_finite

METHOD = "mixcache"
GRANULARITIES = ("step", "cfg", "block")
BATCHED_CFG = ("none", "uncond-first", "cond-first")
INTERVALS = {"acc": (4, 3, 2), "eff": (5, 4, 3)}  # N for D_full < delta1, < delta2, >= delta2


@dataclasses.dataclass(frozen=True)
class MixCacheConfig(PolicyConfig):
    mode: str = "acc"  # "acc": N in {4, 3, 2}; "eff": N in {5, 4, 3}
    profile: str | None = None  # profile JSON path; None = the shipped profile matching model and steps
    granularities: tuple[str, ...] = GRANULARITIES
    penalty: bool = True  # never the same granularity at two consecutive cache-enabled steps
    adaptive_interval: bool = True  # False: N stays `fixed_interval`
    fixed_interval: int = 4
    # How a pipeline that runs CFG as one batched forward orders its halves; "none" = separate forwards
    # (named "cond"/"uncond" by `cache_context`) or no CFG. diffusers' batched pipelines put uncond first.
    batched_cfg: str = "none"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, tuple(INTERVALS))
        check_choice("batched_cfg", self.batched_cfg, BATCHED_CFG)
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
    couples_cfg_branches = True  # the CFG granularity predicts uncond as cond + cached difference

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
        return {
            "output": None,  # last output of this branch (step granularity reuses it)
            "cond": None,  # conditional part of that output, where D_step / D_full are measured
            "cond_step": None,
            "full": None,
            "full_step": None,
            "blocks": {},  # block position -> (step, conditional outputs of that block)
            "mode": "full",
            "rows": None,  # batch rows the running pass computes (None = all)
            "cond_rows": None,  # batched CFG: which rows of a full batch are the conditional half
        }

    def _cond_rows(self, call: ForwardCall) -> slice | None:
        """The conditional half of a batched-CFG forward (None: separate forwards or no CFG)."""
        order = self.config.batched_cfg
        if order == "none" or call.info.branch in ("cond", "uncond"):
            return None
        batch = call.hidden_states.shape[0]
        if batch % 2:
            raise ValueError(
                f"MixCache batched_cfg={order!r} expects [uncond; cond] halves in one forward, but the batch "
                f"size is {batch}; use batched_cfg='none' for a pipeline that does not batch CFG"
            )
        half = batch // 2
        return slice(half, batch) if order == "uncond-first" else slice(0, half)

    def _prepare(self, call: ForwardCall) -> None:
        num_steps = call.info.num_steps
        if num_steps is None:
            raise ValueError("MixCache needs the number of steps: use a pipeline or handle.generation(num_steps=...)")
        if self.controller is not None and self.num_steps == num_steps:
            return
        model = self.model_view.model
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
        cond_rows = state["cond_rows"] = self._cond_rows(call)
        self.branches_seen.add(branch)
        if step not in self.decisions:
            no_cfg = cond_rows is None and "uncond" not in self.branches_seen
            if no_cfg and step > 1 and not self._warned_no_cfg:
                warnings.warn(
                    "MixCache: no separate unconditional branch seen; the CFG granularity is disabled (a "
                    "pipeline that batches uncond and cond in one forward needs batched_cfg='uncond-first' "
                    "or 'cond-first')",
                    stacklevel=2,
                )
                self._warned_no_cfg = True
            if self._warned_no_cfg:
                self.controller.granularities = tuple(g for g in self.controller.granularities if g != "cfg")
            self.decisions[step] = self.controller.decide(step)
            self.trace.append((step, self.decisions[step]))
        mode = self.decisions[step]
        if mode == "step" and state["output"] is not None:
            return call.reuse(state["output"])
        if cond_rows is not None and mode != "full" and self.delta_cfg is not None:
            return self._cond_half_only(call, mode, cond_rows)
        if branch == "uncond" and mode != "full" and step in self.cond_output and self.delta_cfg is not None:
            return call.reuse(self.cond_output[step] + self.delta_cfg)
        # A whole-batch pass of a batched-CFG forward computes every block: its block caches hold cond rows only.
        state["mode"], state["rows"] = (self._pass_mode(state, mode) if cond_rows is None else "full"), None
        output = call.run()
        sample = sample_of(output)
        if not is_finite(sample):
            call.record.nonfinite = True
            return output
        if cond_rows is not None:  # batched CFG, full step: both halves measured from one forward
            cond = sample[cond_rows]
            uncond = torch.cat([sample[: cond_rows.start], sample[cond_rows.stop :]])
            self._measure(call, cond, mode)
            self._measure_cfg(cond, uncond)
        elif branch == "uncond":
            if step in self.cond_output:
                self._measure_cfg(self.cond_output[step], sample)
        else:
            self._measure(call, sample, mode)
            if branch == "cond":
                self.cond_output = {step: sample}
        state["output"] = sample
        return output

    def _cond_half_only(self, call: ForwardCall, mode: str, cond_rows: slice) -> Any:
        """CFG or block granularity on a batched-CFG forward: compute the conditional rows only (block mode:
        from the cached block output on), the unconditional half is cond + cached difference."""
        state = call.state
        state["mode"], state["rows"] = self._pass_mode(state, mode), cond_rows
        cond = sample_of(call.run_rows(cond_rows))
        uncond = cond + self.delta_cfg
        halves = [uncond, cond] if cond_rows.start else [cond, uncond]
        sample = torch.cat(halves)
        if not is_finite(cond):
            call.record.nonfinite = True
            return call.wrap(sample)
        self._measure(call, cond, mode)
        state["output"] = sample
        return call.wrap(sample)

    @staticmethod
    def _pass_mode(state: dict[str, Any], mode: str) -> str:
        """Block mode needs this branch's cached output of the target block; otherwise compute all blocks."""
        if mode.startswith("block:") and int(mode[6:]) in state["blocks"]:
            return mode
        return "full"

    def _measure(self, call: ForwardCall, cond: torch.Tensor, mode: str) -> None:
        """D_step (and D_full after a full step) from the conditional output of this step."""
        step, state, controller = call.info.step, call.state, self.controller
        if state["cond"] is not None:
            controller.d["step"] = rel_l1(cond, state["cond"]) / max(1, step - state["cond_step"])
        if mode == "full":
            d_full = None
            if state["full"] is not None:
                d_full = rel_l1(cond, state["full"]) / max(1, step - state["full_step"])
            state["full"], state["full_step"] = cond, step
            controller.full_step_done(d_full)
        state["cond"], state["cond_step"] = cond, step

    def _measure_cfg(self, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        self.controller.d["cfg"] = rel_l1(uncond, cond)
        self.delta_cfg = uncond - cond

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
        if position in self.block_positions and call.forward.info.branch != "uncond":
            values = call.outputs_of(output)
            if state["rows"] is None and state["cond_rows"] is not None:  # keep the conditional half only
                values = {k: None if v is None else v[state["cond_rows"]] for k, v in values.items()}
            previous = state["blocks"].get(position)
            if previous is not None:
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
