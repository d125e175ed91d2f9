"""Static interval reuse (FORA-style): compute one step in every `interval`, reuse in between.

Two things can be reused at the skipped steps:
- `reuse="output"`: the model output of the last computed step (cheapest; the embedders are skipped too);
- `reuse="blocks"`: every block's residual from the last computed step, while the embedders and the final
  layer still run with the current timestep (what FORA does with attention/MLP features).
The first `warmup_steps` and the last `cooldown_steps` are always computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import PolicyConfig, check_choice, check_int
from ..engine.calls import BlockCall, ForwardCall, sample_of
from ..engine.forecast import COPY, FEATURE_FORECASTS, FORECASTS, Forecaster, History, check_forecast
from ..engine.state import BranchState
from ..registry import register_policy, register_preset
from .base import Policy
from .block_segments import BlockSegments, skip_or_run_block


@dataclasses.dataclass(frozen=True)
class StaticIntervalConfig(PolicyConfig):
    r"""
    Static interval reuse (FORA-style): compute one sampling step in every `interval`, reuse in between.

    After `warmup_steps` computed steps, step `s` is computed when `(s - warmup_steps) % interval == 0` and
    reused otherwise (with `computed` > 1: when `((s - warmup_steps) * computed) % interval < computed`, i.e.
    `computed` steps of every `interval`, evenly spread); the last `cooldown_steps` are always computed. When
    the step count is unknown (a hand-written loop without `handle.generation(num_steps=...)`), the cool-down
    steps are computed at the start instead (`warmup_steps + cooldown_steps` warm-up steps): the same number of
    computed steps, so the speed does not change with how the model is driven. With
    `reuse="output"` a reused step returns the model output of the last computed step of the same CFG branch
    (presets `static-N`); with
    `reuse="blocks"` the embedders and the final layer still run with the current timestep and every block
    adds its residual cached at the last computed step, which is what FORA does with its attention / MLP
    features (presets `fora-N`, 2 warm-up steps).

    Paper: "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration", Selvaraju et al., 2024
    (arXiv:2407.01425).

    Args:
        interval (`int`, defaults to `2`):
            Compute 1 step in every `interval`, in [1, 100]; 1 computes every step (never reuses).
        warmup_steps (`int`, defaults to `2`):
            The first steps, always computed; >= 0.
        cooldown_steps (`int`, defaults to `0`):
            The last steps, always computed; >= 0. They need the step count (a pipeline, or
            `handle.generation(num_steps=...)`); without it they are added to the warm-up steps.
        reuse (`str`, defaults to `"output"`):
            What a reused step takes from the last computed step: `"output"` (the whole model output; the
            cheapest, the embedders are skipped too) or `"blocks"` (every block's residual, FORA).
        forecast (`str`, defaults to `"copy"`):
            How the reused output / residuals are made from the computed steps: `"copy"` (the last one),
            `"taylor1"`, `"taylor2"`, `"hermite"` or, with `reuse="output"`, `"multistep"` (see
            `ditcache.engine.forecast` and docs/METHODS.md, "Forecasting"). E.g. `"fora-3:forecast=taylor1"`.
        computed (`int`, defaults to `1`):
            Steps computed in every `interval`, in [1, interval], evenly spread: a speedup between two integer
            intervals (3 of 10 is ~3.1x steps). 1 is plain FORA.

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> ditcache.preset("fora-3") == ditcache.StaticIntervalConfig(interval=3, warmup_steps=2, reuse="blocks")
        True
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, ditcache.StaticIntervalConfig(interval=2, warmup_steps=2))
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=6, handle=handle)
        >>> [record.step for record in handle.records() if record.kind == "reused"]
        [3, 5]
        >>> handle.remove()
    """

    interval: int = 2  # compute 1 step in every `interval` (1 = never reuse)
    warmup_steps: int = 2
    cooldown_steps: int = 0
    reuse: str = "output"  # "output" | "blocks"
    forecast: str = "copy"  # how reused values are made from the computed steps (engine/forecast.py)
    computed: int = 1  # steps computed in every `interval`, evenly spread

    def __post_init__(self) -> None:
        check_int("interval", self.interval, 1, 100)
        check_int("computed", self.computed, 1, self.interval)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("cooldown_steps", self.cooldown_steps, 0)
        check_choice("reuse", self.reuse, ("output", "blocks"))
        if self.reuse == "output":
            check_forecast(self.forecast)
        else:
            check_forecast(self.forecast, FEATURE_FORECASTS, "multistep extrapolates whole outputs: reuse='output'")

    def computes(self, step: int, num_steps: int | None) -> bool:
        # Without a step count the cool-down cannot be placed: compute those steps first instead (same count).
        warmup = self.warmup_steps if num_steps is not None else self.warmup_steps + self.cooldown_steps
        if step < warmup:
            return True
        if num_steps is not None and step >= num_steps - self.cooldown_steps:
            return True
        # Bresenham-style: computed / interval of the steps, evenly spread (computed = 1: every interval-th step)
        return ((step - warmup) * self.computed) % self.interval < self.computed


@dataclasses.dataclass(frozen=True)
class ReuseScheduleConfig(PolicyConfig):
    r"""
    Fixed reuse schedule: reuse exactly the listed steps (the last computed output, per branch); compute all others.

    Used for analyses (the impact of reusing one single step) and by methods that calibrate a schedule
    offline. A listed step is computed anyway when its branch has no cached output yet. Not a published
    method and no preset: build it directly.

    Args:
        reuse_steps (`tuple[int, ...]`, defaults to `()`):
            0-based indices of the steps that reuse the last computed output; a tuple of integers >= 1
            (step 0 has nothing to reuse). `()` computes every step.
        forecast (`str`, defaults to `"copy"`):
            How a reused output is made from the computed steps: one of `"copy"`, `"taylor1"`, `"taylor2"`,
            `"hermite"`, `"multistep"` (see docs/METHODS.md, "Forecasting").

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, ditcache.ReuseScheduleConfig(reuse_steps=(2, 4)))
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=6, handle=handle)
        >>> [record.step for record in handle.records() if record.kind == "reused"]
        [2, 4]
        >>> handle.remove()
    """

    reuse_steps: tuple[int, ...] = ()
    forecast: str = "copy"  # how a reused output is made from the computed steps (engine/forecast.py)

    def __post_init__(self) -> None:
        if not isinstance(self.reuse_steps, tuple):
            raise ValueError(f"reuse_steps must be a tuple of step indices, got {self.reuse_steps!r}")
        for step in self.reuse_steps:
            check_int("reuse_steps[...]", step, 1)
        check_forecast(self.forecast, FORECASTS)


@dataclasses.dataclass
class OutputState(BranchState):
    output: torch.Tensor | None = None  # this branch's last computed model output
    history: History = dataclasses.field(default_factory=History)  # computed outputs a forecast reads


@register_policy(ReuseScheduleConfig)
class ReuseSchedulePolicy(Policy):
    branch_state = OutputState

    def __init__(self, config: ReuseScheduleConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.forecaster = Forecaster.of(config.forecast)

    def forward(self, call: ForwardCall) -> Any:
        return reuse_or_compute(call, call.info.step in self.config.reuse_steps, self.forecaster)


def reuse_or_compute(call: ForwardCall, reuse: bool, forecaster: Forecaster = COPY) -> Any:
    """Shared by output-reusing policies: reuse `call.state.output` (or its forecast from the computed outputs)
    or compute and cache it."""
    state: OutputState = call.state
    step = call.info.step
    if reuse and state.output is not None:
        return call.reuse(forecaster.predict(state.history, step, state.output))
    output = call.run()
    state.output = forecaster.remember(call, state.history, step, call.store(sample_of(output)))
    return output


@dataclasses.dataclass
class StaticState(OutputState):
    segments: BlockSegments = dataclasses.field(default_factory=BlockSegments)  # block residuals (reuse="blocks")
    reusing: bool = False  # the running forward skips every block


@register_policy(StaticIntervalConfig)
class StaticIntervalPolicy(Policy):
    branch_state = StaticState

    def __init__(self, config: StaticIntervalConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.uses_block_hooks = config.reuse == "blocks"
        self.forecaster = Forecaster.of(config.forecast)

    def forward(self, call: ForwardCall) -> Any:
        config: StaticIntervalConfig = self.config
        state: StaticState = call.state
        compute = config.computes(call.info.step, call.info.num_steps)
        if config.reuse == "output":
            return reuse_or_compute(call, not compute, self.forecaster)
        # Block residual reuse: blocks decide from this flag; residuals must exist for every block.
        state.reusing = not compute and state.segments.complete(self.model_view.num_blocks)
        state.segments.begin()
        output = call.run()
        state.segments.finish(call, self.forecaster)
        return output

    def block(self, call: BlockCall) -> Any:
        state: StaticState = call.forward.state
        return skip_or_run_block(call, state.reusing, self.forecaster, state.segments)


for _n in (2, 3, 4):
    register_preset(
        f"fora-{_n}",
        lambda n=_n: StaticIntervalConfig(interval=n, warmup_steps=2, reuse="blocks"),
        f"FORA-style: reuse block residuals, compute 1 step in {_n} after 2 warm-up steps",
    )
    register_preset(
        f"static-{_n}",
        lambda n=_n: StaticIntervalConfig(interval=n, warmup_steps=2, reuse="output"),
        f"reuse the whole model output, compute 1 step in {_n} after 2 warm-up steps",
    )

# The project's own presets (issue 16): FORA's block residuals forecast with HiCache's damped (scaled-Hermite)
# series from the last 3 computed steps. Chosen per speed class from the bench on the reference models
# (docs/METHODS.md, "Forecasting"): on ref-image and ref-dit it beat copy by +3.5 to +6 dB at both speeds and
# kept class accuracy at 1.0; order-1 Taylor was +1.7 dB better at 2x on ref-image but 0.6 / 1.5 dB worse on
# ref-dit and cost a class there; order-2 Taylor lost to copy (it amplifies the residuals' step-to-step noise).
for _speed, _n in (("2x", 2), ("3x", 3)):
    register_preset(
        f"fora-hermite-{_speed}",
        lambda n=_n: StaticIntervalConfig(interval=n, warmup_steps=2, reuse="blocks", forecast="hermite"),
        f"FORA block residuals, 1 step in {_n} computed, reused steps forecast the residuals from the last 3 "
        f"computed steps (HiCache's scaled-Hermite series; ~{_speed} MACs)",
    )

# 1.5x class: the first 8 and the last 8 steps computed, fora-hermite-2x's schedule in between (33 of 50 computed,
# 1.50-1.51x MACs). The ends of the trajectory are the expensive ones to reuse: against 16 computed warm-up steps
# (the first version of this preset) the same 33 steps gave +0.9 dB on ref-image, +2.8 on ref-video, +3.4 on ref-dit
# and +2.5 on ref-latte (16 images / 8 clips; docs/METHODS.md, "Speed classes"). Without a step count (a bare
# loop) the 8 cool-down steps become warm-up steps: 16 then 1 in 2, the same 33 steps.
register_preset(
    "fora-hermite-1.5x",
    lambda: StaticIntervalConfig(interval=2, warmup_steps=8, cooldown_steps=8, reuse="blocks", forecast="hermite"),
    "FORA block residuals, the first 8 and last 8 steps computed and 1 step in 2 in between, reused steps forecast "
    "the residuals from the last 3 computed steps (HiCache's scaled-Hermite series; ~1.5x MACs at 50 steps)",
)

# 3x class, block reuse: 3 steps of every 10 computed, evenly spread, after 1 warm-up step (16 of 50 computed,
# 3.06x MACs on ref-image, 3.11x on ref-dit). Measured (docs/METHODS.md, "Speed classes"): +3.7 dB over fewer steps
# at equal MACs on ref-image (16 samples) and +6.7 dB on ref-dit (4 samples), where static-hermite-3x was +1.1 dB.
register_preset(
    "fora-hermite-3of10",
    lambda: StaticIntervalConfig(interval=10, computed=3, warmup_steps=1, reuse="blocks", forecast="hermite"),
    "FORA block residuals, 3 steps of every 10 computed (evenly spread) after 1 warm-up step, reused steps forecast "
    "the residuals from the last 3 computed steps (HiCache's scaled-Hermite series; ~3.1x MACs at 50 steps)",
)

# 3x class: 17 of 50 steps computed (interval 3, no warm-up), the others return the model output forecast from the
# last 3 computed outputs. Whole-output reuse costs nothing, so the MACs speedup is exactly 50 / 17 = 2.94x on
# every model; FORA's block reuse still runs the embedders and final layer at reused steps (1 % of a step on
# ref-image), which puts 17 computed steps at 2.88x there, under the class floor of 2.9x.
register_preset(
    "static-hermite-3x",
    lambda: StaticIntervalConfig(interval=3, warmup_steps=0, reuse="output", forecast="hermite"),
    "1 step in 3 computed from step 0 (17 of 50), reused steps forecast the model output from the last 3 computed "
    "steps (HiCache's scaled-Hermite series; 2.94x MACs at 50 steps)",
)
