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
import functools
import warnings
from typing import Any, ClassVar

import torch

from ..calibration.profiles import Profile, find_profile
from ..config import PolicyConfig, check_bool, check_choice, check_int
from ..engine.calls import BlockCall, ForwardCall, sample_of
from ..engine.forecast import FEATURE_FORECASTS, FORECASTS, Forecaster, History, check_forecast
from ..engine.state import BranchState
from ..registry import register_policy, register_preset
from .base import Policy
from .mixcache_controller import (
    CFG,
    FULL,
    STEP,
    Choice,
    Granularity,
    MixCacheController,
    MixCacheProfileData,
    block_choice,
)

METHOD = "mixcache"
GRANULARITIES = ("step", "cfg", "block")
BATCHED_CFG = ("none", "uncond-first", "cond-first")
INTERVALS = {"acc": (4, 3, 2), "eff": (5, 4, 3)}  # N for D_full < delta1, < delta2, >= delta2
Outputs = dict[str, "torch.Tensor | None"]


@dataclasses.dataclass(frozen=True)
class MixCacheConfig(PolicyConfig):
    r"""
    MixCache: adaptive hybrid caching that picks, per step, between step, CFG and block granularity.

    One decision per step, shared by both CFG branches. Warm-up: compute while D_step (relative L1 between
    consecutive outputs) >= theta. Then every N-th step is computed fully; after each full step N is
    rescaled from D_full against delta1 / delta2 (`mode`). The other steps use the allowed granularity with
    the smallest P = D x I (latest measured redundancy x offline impact); with `penalty` the granularity of
    the previous cache-enabled step is excluded. step: both branches reuse their previous output; cfg: the
    conditional branch runs, the unconditional one is cond + cached (uncond - cond); block i: the
    conditional branch feeds its previous output of block i to block i + 1 and runs only the later blocks.
    theta, delta1, delta2 and the impacts come from a calibration profile (`ditcache calibrate mixcache`),
    tied to the model and the step count, so applying needs one. Presets `mixcache-acc` and `mixcache-eff`.

    Paper: "Adaptive Hybrid Caching for Efficient Text-to-Video Diffusion Model Acceleration" (MixCache),
    Wei et al., 2025.

    Args:
        mode (`str`, defaults to `"acc"`):
            The interval set: `"acc"` (accuracy first, N in {4, 3, 2}) or `"eff"` (efficiency first, N in
            {5, 4, 3}), for D_full < delta1, < delta2, >= delta2; N starts at the middle value.
        profile (`str`, *optional*, defaults to `None`):
            Path of a profile JSON; `None` = the shipped profile matching the model and the step count.
        granularities (`tuple[str, ...]`, defaults to `("step", "cfg", "block")`):
            The granularities cache-enabled steps may use; a non-empty tuple of `"step"`, `"cfg"`, `"block"`.
        penalty (`bool`, defaults to `True`):
            Never use the same granularity at two consecutive cache-enabled steps.
        adaptive_interval (`bool`, defaults to `True`):
            Rescale N after each full step; `False` keeps N at `fixed_interval`.
        fixed_interval (`int`, defaults to `4`):
            N when `adaptive_interval` is `False`, in [2, 50].
        batched_cfg (`str`, defaults to `"none"`):
            How a pipeline that runs CFG as one batched forward orders its halves: `"uncond-first"` (what
            diffusers' batched pipelines do), `"cond-first"`, or `"none"` for separate forwards (named
            `"cond"` / `"uncond"` by `cache_context`) or no CFG.
        forecast (`str`, defaults to `"copy"`):
            How the step granularity's reused output and the block granularity's reused block output are made
            from the computed steps: `"copy"` (the last one), `"taylor1"`, `"taylor2"`, `"hermite"` or,
            without the block granularity, `"multistep"` (see docs/METHODS.md, "Forecasting").

    Example:
        >>> import ditcache
        >>> config = ditcache.MixCacheConfig(mode="eff")
        >>> config == ditcache.preset("mixcache-eff")
        True
        >>> config.replace(penalty=False, granularities=("step", "block")).granularities
        ('step', 'block')
        >>> ditcache.parse_policy("mixcache-acc:adaptive_interval=False:fixed_interval=3").fixed_interval
        3
        >>> ditcache.MixCacheConfig.profile_method  # applying needs a profile of this method
        'mixcache'
    """

    profile_method: ClassVar[str] = METHOD  # needs a calibration profile of this method
    mode: str = "acc"  # "acc": N in {4, 3, 2}; "eff": N in {5, 4, 3}
    profile: str | None = None  # profile JSON path; None = the shipped profile matching model and steps
    granularities: tuple[str, ...] = GRANULARITIES
    penalty: bool = True  # never the same granularity at two consecutive cache-enabled steps
    adaptive_interval: bool = True  # False: N stays `fixed_interval`
    fixed_interval: int = 4
    # How a pipeline that runs CFG as one batched forward orders its halves; "none" = separate forwards
    # (named "cond"/"uncond" by `cache_context`) or no CFG. diffusers' batched pipelines put uncond first.
    batched_cfg: str = "none"
    forecast: str = "copy"  # how reused outputs / block outputs are made from the computed steps

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
        if "block" in self.granularities:
            check_forecast(self.forecast, FEATURE_FORECASTS, "the block granularity reuses block outputs")
        else:
            check_forecast(self.forecast, FORECASTS)


@dataclasses.dataclass
class MixCacheState(BranchState):
    output: torch.Tensor | None = None  # last output of this branch (step granularity reuses it)
    history: History = dataclasses.field(default_factory=History)  # outputs a forecast reads
    histories: dict[int, History] = dataclasses.field(default_factory=dict)  # block position -> forecast input
    cond: torch.Tensor | None = None  # conditional part of that output, where D_step / D_full are measured
    cond_step: int | None = None
    full: torch.Tensor | None = None  # conditional output of the last full step
    full_step: int | None = None
    blocks: dict[int, tuple[int, Outputs]] = dataclasses.field(default_factory=dict)  # position -> (step, outputs)
    choice: Choice = FULL  # what the running pass does (FULL or a block choice)
    rows: slice | None = None  # batch rows the running pass computes (None = all)
    cond_rows: slice | None = None  # batched CFG: which rows of a full batch are the conditional half


@register_policy(MixCacheConfig)
class MixCachePolicy(Policy):
    branch_state = MixCacheState
    uses_block_hooks = True

    @classmethod
    def requirements(cls, config: MixCacheConfig) -> tuple[str, ...]:
        return ("batch_rows",) if config.batched_cfg != "none" else ()  # CFG steps compute the cond rows only

    couples_cfg_branches = True  # the CFG granularity predicts uncond as cond + cached difference

    def __init__(self, config: MixCacheConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self._given = Profile.load(config.profile) if config.profile else None
        self._warned_no_cfg = False
        self.forecaster = Forecaster.of(config.forecast)
        self.reset()

    def reset(self) -> None:
        self.controller: MixCacheController | None = None
        self.num_steps: int | None = None
        self.decisions: dict[int, Choice] = {}
        self.cond_output: dict[int, torch.Tensor] = {}  # step -> cond output (for the uncond branch)
        self.delta_cfg: torch.Tensor | None = None
        self.branches_seen: set[str] = set()
        self.trace: list[tuple[int, Choice]] = []

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
        profile = self._given or find_profile(self.config.profile_method, model, num_steps)
        profile.check(self.config.profile_method, model, num_steps)
        config = self.config
        self.controller = MixCacheController(
            profile=MixCacheProfileData.from_dict(profile.data),
            intervals=INTERVALS[config.mode],
            granularities=frozenset(Granularity(g) for g in config.granularities),
            penalty=config.penalty,
            adaptive_interval=config.adaptive_interval,
            fixed_interval=config.fixed_interval,
        )
        self.num_steps = num_steps

    @property
    def block_positions(self) -> list[int]:
        return sorted(self.controller.profile.impact_block) if self.controller else []

    # ------------------------------------------------------------------ forward
    def forward(self, call: ForwardCall) -> Any:
        self._prepare(call)
        step, branch, state = call.info.step, call.info.branch, call.state
        cond_rows = state.cond_rows = self._cond_rows(call)
        self.branches_seen.add(branch)
        if step not in self.decisions:
            self._check_cfg_branch(step, cond_rows)
            self.decisions[step] = self.controller.decide(step)
            self.trace.append((step, self.decisions[step]))
        choice = self.decisions[step]
        if choice == STEP and state.output is not None:
            return call.reuse(self.forecaster.predict(state.history, step, state.output))
        if cond_rows is not None and choice != FULL and self.delta_cfg is not None:
            return self._cond_half_only(call, choice, cond_rows)
        if branch == "uncond" and choice != FULL and step in self.cond_output and self.delta_cfg is not None:
            return call.reuse(self.cond_output[step] + self.delta_cfg)
        # A whole-batch pass of a batched-CFG forward computes every block: its block caches hold cond rows only.
        state.choice, state.rows = (self._pass_choice(state, choice) if cond_rows is None else FULL), None
        output = call.run()
        sample = call.store(sample_of(output))
        if cond_rows is not None:  # batched CFG, full step: both halves measured from one forward
            cond = sample[cond_rows]
            uncond = torch.cat([sample[: cond_rows.start], sample[cond_rows.stop :]])
            self._measure(call, cond, choice)
            self._measure_cfg(call, cond, uncond)
        elif branch == "uncond":
            if step in self.cond_output:
                self._measure_cfg(call, self.cond_output[step], sample)
        else:
            self._measure(call, sample, choice)
            if branch == "cond":
                self.cond_output = {step: sample}
        state.output = self.forecaster.remember(call, state.history, step, sample)
        return output

    def _check_cfg_branch(self, step: int, cond_rows: slice | None) -> None:
        """Without an unconditional branch (or batched halves) the CFG granularity cannot apply: say so once."""
        no_cfg = cond_rows is None and "uncond" not in self.branches_seen
        if no_cfg and step > 1 and not self._warned_no_cfg:
            warnings.warn(
                "MixCache: no separate unconditional branch seen; the CFG granularity is disabled (a "
                "pipeline that batches uncond and cond in one forward needs batched_cfg='uncond-first' "
                "or 'cond-first')",
                stacklevel=3,
            )
            self._warned_no_cfg = True
        if self._warned_no_cfg:
            self.controller.granularities = self.controller.granularities - {Granularity.CFG}

    def _cond_half_only(self, call: ForwardCall, choice: Choice, cond_rows: slice) -> Any:
        """CFG or block granularity on a batched-CFG forward: compute the conditional rows only (block choice:
        from the cached block output on), the unconditional half is cond + cached difference."""
        state: MixCacheState = call.state
        state.choice, state.rows = self._pass_choice(state, choice), cond_rows
        cond = sample_of(call.run_rows(cond_rows))
        uncond = cond + call.fetch(self.delta_cfg)
        halves = [uncond, cond] if cond_rows.start else [cond, uncond]
        sample = call.store(torch.cat(halves))
        self._measure(call, sample[cond_rows], choice)  # measured on what is kept, like the cached outputs
        state.output = self.forecaster.remember(call, state.history, call.info.step, sample)
        return call.wrap(sample)

    @staticmethod
    def _pass_choice(state: MixCacheState, choice: Choice) -> Choice:
        """Block reuse needs this branch's cached output of the target block; otherwise compute all blocks."""
        if choice.granularity is Granularity.BLOCK and choice.block in state.blocks:
            return choice
        return FULL

    def _measure(self, call: ForwardCall, cond: torch.Tensor, choice: Choice) -> None:
        """D_step (and D_full after a full step) from the conditional output of this step."""
        step, state, controller = call.info.step, call.state, self.controller
        # the model's output: whole on every rank under context parallelism, this rank's rows under data parallelism
        change = functools.partial(call.decisions.rel_l1, model_level=True)
        if state.cond is not None:
            controller.d[STEP] = change(cond, state.cond) / max(1, step - state.cond_step)
        if choice == FULL:
            d_full = None
            if state.full is not None:
                d_full = change(cond, state.full) / max(1, step - state.full_step)
            state.full, state.full_step = cond, step
            controller.full_step_done(d_full)
        state.cond, state.cond_step = cond, step

    def _measure_cfg(self, call: ForwardCall, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        self.controller.d[CFG] = call.decisions.rel_l1(uncond, cond, model_level=True)
        self.delta_cfg = uncond - cond

    # ------------------------------------------------------------------ blocks
    def block(self, call: BlockCall) -> Any:
        state: MixCacheState = call.forward.state
        position = call.ref.position
        if state.choice.granularity is Granularity.BLOCK:
            if position < state.choice.block:
                return call.passthrough()
            if position == state.choice.block and position in state.blocks:
                history = state.histories.get(position)
                return call.replace(self.forecaster.predict(history, call.info.step, state.blocks[position][1]))
        output = call.run()
        if position in self.block_positions and call.forward.info.branch != "uncond":
            values = call.outputs_of(output)
            if state.rows is None and state.cond_rows is not None:  # keep the conditional half only
                values = {k: None if v is None else v[state.cond_rows] for k, v in values.items()}
            stored = call.forward.store(values)  # compared with the previous one as kept (cache_dtype / device)
            previous = state.blocks.get(position)
            if previous is not None:
                step, old = previous
                gap = max(1, call.forward.info.step - step)
                change = call.forward.decisions.rel_l1(stored["hidden_states"], old["hidden_states"])  # a shard
                self.controller.d[block_choice(position)] = change / gap
            state.blocks[position] = (call.forward.info.step, stored)
            self.forecaster.remember_at(call.forward, state.histories, position, call.forward.info.step, stored)
        return output

    def cached_tensors(self) -> Any:
        return {"cond": self.cond_output, "delta_cfg": self.delta_cfg}

    def on_nonfinite(self, call: ForwardCall) -> None:
        # Measurements and the CFG difference may hold NaN now: measure again from the next computed steps.
        self.cond_output, self.delta_cfg = {}, None
        if self.controller is not None:
            self.controller.d.clear()


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
