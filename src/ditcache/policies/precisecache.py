"""PreciseCache (paper 004): LFCache decides per step, BlockCache skips blocks inside computed steps.

LFCache. The first `warmup_steps` (3) are always computed. At every later step the model runs a cheap
*trial* forward on a downsampled latent; the low-frequency part (centred circular FFT mask, radius
`radius` x min(H, W)) of that trial prediction is compared (L2) with the low-frequency part of the
downsampled cached prediction. This low-frequency difference (LFD) is accumulated; while the sum stays
below delta the cached prediction is reused, otherwise the step is computed and the sum reset.
delta = alpha x the largest LFD seen during warm-up (trials run there too, to measure it).

CFG. The paper caches the final guided prediction. Here each branch caches its own prediction and the
decision is taken once per step, by the first branch that reaches it (its trial is the only one), and
applied to every branch: reusing cond and uncond together is exactly reusing the guided prediction.

BlockCache. In a computed step that refreshes, every block runs and its change ||output - input|| is
measured; the `block_cache_ratio` share of blocks that changed least is skipped (input + cached residual)
in the next `block_cache_steps` computed steps, then the choice is refreshed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, ClassVar

import torch

from ..config import PolicyConfig, check_float, check_int
from ..engine.calls import BlockCall, ForwardCall
from ..engine.forecast import FEATURE_FORECASTS, FORECASTS, Forecaster, History, check_forecast
from ..engine.latents import downsample, from_5d, to_5d
from ..numerics import low_frequency
from ..registry import register_policy, register_preset
from .base import Policy, Residuals, calibrated_threshold
from .static import OutputState, reuse_or_compute

PAPER_DOWNSAMPLE_VIDEO = (2, 4, 4)
PAPER_DOWNSAMPLE_IMAGE = (1, 4, 4)


@dataclasses.dataclass(frozen=True)
class PreciseCacheConfig(PolicyConfig):
    r"""
    PreciseCache: LFCache decides per step from a cheap trial forward; BlockCache skips blocks inside computed steps.

    LFCache: the first `warmup_steps` are always computed. From step 1 on, every step first runs a *trial*
    forward on the latent average-pooled by `downsample`, and the low-frequency part (centred FFT disc of
    radius `radius`) of its prediction is compared (L2) with that of the equally pooled cached prediction.
    This low-frequency difference (LFD) is accumulated; while the sum stays below delta = `alpha` x the
    largest LFD of the warm-up, the cached prediction is reused, otherwise the step is computed and the sum
    reset. The decision is taken once per step and applied to both CFG branches. BlockCache (on when
    `block_cache_ratio` > 0): at a refreshing computed step every block's change ||output - input|| is
    measured, and the `block_cache_ratio` share that changed least is skipped with cached residuals in the
    next `block_cache_steps` computed steps. Presets `precisecache-base` (alpha 0.5), `precisecache-turbo`
    (alpha 0.7) and `precisecache-flash` (turbo + 40% of blocks cached, L = 3). Trial forwards are counted
    in stats and MACs.

    Paper: "PreciseCache: Precise Feature Caching for Efficient and High-Fidelity Video Generation"
    (anonymous, under review; paper 004 of docs/METHODS.md).

    Args:
        alpha (`float`, defaults to `0.5`):
            delta = alpha x the largest warm-up LFD, in (0, 100]; larger = more reuse.
        warmup_steps (`int`, defaults to `3`):
            The first steps, always computed; the LFDs of steps 1 .. warmup_steps - 1 set delta; >= 2.
        downsample (`tuple[int, int, int]`, *optional*, defaults to `None`):
            (frames, height, width) pooling factors of the trial latent, each in [1, 64]. `None` = the
            paper's 2x4x4 (video) / 4x4 (image), each factor halved until it divides the latent grid and
            keeps the pooled grid divisible by the patch size.
        radius (`float`, defaults to `0.2`):
            Low-frequency mask radius as a fraction of min(H, W) of the trial grid, in (0, 1].
        block_cache_ratio (`float`, defaults to `0.0`):
            Share of the blocks BlockCache skips, in [0, 0.95]; 0 turns BlockCache off (no block hooks).
        block_cache_steps (`int`, defaults to `3`):
            L: the number of computed steps that reuse one block selection before it is refreshed; >= 1.
        target_reuse (`float | None`, defaults to `None`):
            Reuse about this share of the steps, in (0, 0.95]: delta is derived from the model's calibrated
            per-step LFD (`ditcache.calibrate(model_or_pipe, "precisecache", num_steps=...)`) instead of
            alpha x the warm-up LFD, which only fits some models (on others it never reuses). Presets
            `precisecache-2x` (0.5) and `precisecache-3x` (0.67). None = the paper's rule.
        forecast (`str`, defaults to `"copy"`):
            How a reused prediction (and BlockCache's skipped residuals) is made from the computed steps:
            `"copy"` (the last one), `"taylor1"`, `"taylor2"`, `"hermite"` or, without BlockCache,
            `"multistep"` (see docs/METHODS.md, "Forecasting"). The trial compares with what would be reused.
        trial_patience (`int | None`, defaults to `None`):
            Stop paying for trials that keep choosing to compute: after this many consecutive trials (after
            the warm-up) that did not reuse, the next 1, 2, 4, then up to `MAX_TRIAL_SKIP` (8) steps are computed
            without a trial, the skip doubling with every further failed trial; a trial that reuses starts
            over. >= 1; None = the paper's rule, a trial at every step. E.g. `"precisecache-base:trial_patience=4"`.

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> ditcache.preset("precisecache-turbo") == ditcache.PreciseCacheConfig(alpha=0.7)
        True
        >>> ditcache.PreciseCacheConfig(alpha=0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be in (0.0, 100.0], got 0
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, "precisecache-base")
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=4, handle=handle)
        >>> [step for step, lfd in handle.policy.lfd_trace]  # one trial per step once a prediction is cached
        [1, 2, 3]
        >>> handle.remove()
    """

    profile_method: ClassVar[str] = "precisecache"  # only read with target_reuse set
    alpha: float = 0.5  # delta = alpha * max warm-up LFD; larger = more reuse
    warmup_steps: int = 3  # always computed; LFDs measured at steps 1..warmup_steps-1 set delta
    # (frames, height, width) pooling of the trial latent; None = the paper's 2x4x4 (video) / 4x4
    # (image), each factor halved until it divides the latent grid and keeps it divisible by the patch.
    downsample: tuple[int, int, int] | None = None
    radius: float = 0.2  # low-frequency mask radius as a fraction of min(H, W) of the trial grid
    block_cache_ratio: float = 0.0  # share of blocks skipped by BlockCache (0 = off)
    block_cache_steps: int = 3  # L: computed steps that reuse one block selection
    # Reuse this share of the steps, with delta calibrated on the model (`ditcache.calibrate(...,
    # "precisecache")`) instead of alpha x the warm-up LFD; None = the paper's rule.
    target_reuse: float | None = None
    forecast: str = "copy"  # how a reused prediction / skipped residual is made from the computed steps
    trial_patience: int | None = None  # failed trials in a row before trials back off; None = always trial

    def __post_init__(self) -> None:
        check_float("alpha", self.alpha, 0.0, 100.0, low_open=True)
        if self.trial_patience is not None:
            check_int("trial_patience", self.trial_patience, 1)
        check_int("warmup_steps", self.warmup_steps, 2)
        if self.downsample is not None:
            if not isinstance(self.downsample, tuple) or len(self.downsample) != 3:
                raise ValueError(f"downsample must be None or a (frames, height, width) tuple, got {self.downsample!r}")
            for axis, factor in zip(("frames", "height", "width"), self.downsample):
                check_int(f"downsample[{axis}]", factor, 1, 64)
        check_float("radius", self.radius, 0.0, 1.0, low_open=True)
        check_float("block_cache_ratio", self.block_cache_ratio, 0.0, 0.95)
        check_int("block_cache_steps", self.block_cache_steps, 1)
        if self.target_reuse is not None:
            check_float("target_reuse", self.target_reuse, 0.0, 0.95, low_open=True)
        if self.block_cache_ratio > 0:
            check_forecast(self.forecast, FEATURE_FORECASTS, "BlockCache reuses block residuals")
        else:
            check_forecast(self.forecast, FORECASTS)


def auto_downsample(grid: tuple[int, int, int], patch: tuple[int, int, int], video: bool) -> tuple[int, int, int]:
    """The paper's factors, each halved until the pooled grid stays divisible by the patch size."""
    factors = list(PAPER_DOWNSAMPLE_VIDEO if video else PAPER_DOWNSAMPLE_IMAGE)
    for i in range(3):
        while factors[i] > 1 and (grid[i] % factors[i] or (grid[i] // factors[i]) % patch[i]):
            factors[i] //= 2
    return tuple(factors)


@dataclasses.dataclass
class LFCacheController:
    """The step decision of LFCache from a stream of LFD values (pure logic, no tensors)."""

    alpha: float
    warmup_steps: int
    warmup_lfds: list[float] = dataclasses.field(default_factory=list)
    accumulated: float = 0.0
    delta: float | None = None

    def decide(self, step: int, lfd: float) -> bool:
        """True = reuse the cached prediction at `step`, given its LFD."""
        if step < self.warmup_steps:
            if math.isfinite(lfd):  # a NaN / inf trial must not set delta (it would make every step reuse)
                self.warmup_lfds.append(lfd)
            return False
        if self.delta is None:
            self.delta = self.alpha * max(self.warmup_lfds, default=0.0)
        self.accumulated += lfd
        if self.accumulated < self.delta:
            return True
        self.accumulated = 0.0
        return False


MAX_TRIAL_SKIP = 8  # the longest run of steps computed without a trial (a late chance to reuse stays open)


@dataclasses.dataclass
class TrialBackoff:
    """When LFCache stops trialling: a trial costs a forward on the pooled latent, so a model on which trials
    keep choosing to compute pays for nothing. After `patience` failed trials in a row, the steps after each
    further failed trial are computed without one: 1, 2, 4, ..., `MAX_TRIAL_SKIP`. Skipping is exact with
    respect to the accumulate-and-reset rule: it only follows a failed trial, which reset the sum."""

    patience: int | None
    failures: int = 0  # consecutive trials after the warm-up that chose to compute
    skip_left: int = 0  # steps still to compute without a trial

    def trial_due(self) -> bool:
        """Whether this step runs a trial (False: compute it without one). Called once per decided step."""
        if self.skip_left > 0:
            self.skip_left -= 1
            return False
        return True

    def record(self, reused: bool) -> None:
        if reused or self.patience is None:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.patience:
            self.skip_left = min(2 ** (self.failures - self.patience), MAX_TRIAL_SKIP)


class BlockPass(enum.Enum):
    FULL = "full"  # every block runs; residuals and changes are refreshed
    PARTIAL = "partial"  # the selected blocks are skipped with their cached residuals


@dataclasses.dataclass
class PreciseCacheState(OutputState):
    residuals: dict[int, Residuals] = dataclasses.field(default_factory=dict)  # block position -> residuals
    histories: dict[int, History] = dataclasses.field(default_factory=dict)  # block position -> forecast input
    change: dict[int, float] = dataclasses.field(default_factory=dict)  # block position -> ||output - input||
    skip: set[int] = dataclasses.field(default_factory=set)  # BlockCache: positions skipped in partial passes
    uses_left: int = 0  # partial passes left before the selection is refreshed
    block_pass: BlockPass = BlockPass.FULL


@register_policy(PreciseCacheConfig)
class PreciseCachePolicy(Policy):
    branch_state = PreciseCacheState
    requires = ("resized_forward",)

    def __init__(self, config: PreciseCacheConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.uses_block_hooks = config.block_cache_ratio > 0
        self.forecaster = Forecaster.of(config.forecast)
        self.reset()

    def reset(self) -> None:
        self.decisions: dict[int, bool] = {}  # step -> reuse?
        self.controller = LFCacheController(self.config.alpha, self.config.warmup_steps)
        self.backoff = TrialBackoff(self.config.trial_patience)
        self._alpha_calibrated = False
        self.lfd_trace: list[tuple[int, float]] = []  # (step, LFD) for analysis

    # ------------------------------------------------------------------ LFCache
    def forward(self, call: ForwardCall) -> Any:
        step, state = call.info.step, call.state
        # What a reuse would return (the cached prediction or its forecast): the trial is compared with it.
        candidate = None if state.output is None else self.forecaster.predict(state.history, step, state.output)
        if step not in self.decisions:
            self.decisions[step] = self._decide(call, candidate)
        if self.decisions[step] and candidate is not None:
            return call.reuse(candidate)
        self._plan_blocks(state)
        output = reuse_or_compute(call, reuse=False, forecaster=self.forecaster)
        self._after_blocks(state)
        return output

    def _decide(self, call: ForwardCall, cached: torch.Tensor | None) -> bool:
        target = self.config.target_reuse
        if target is not None and not self._alpha_calibrated:
            # The LFD is a norm over the whole batch, so an absolute delta would depend on the batch size and
            # the prompts: keep the calibrated delta relative to the warm-up LFDs, as the paper's alpha is.
            warmup = self.config.warmup_steps
            delta, warmup_max = calibrated_threshold(self, call, target, warmup, relative_to_warmup=True)
            self.controller.alpha = delta / warmup_max
            self._alpha_calibrated = True
        if cached is None:
            return False
        after_warmup = call.info.step >= self.config.warmup_steps
        if after_warmup and not self.backoff.trial_due():
            return False
        lfd = self.trial_lfd(call, cached)
        self.lfd_trace.append((call.info.step, lfd))
        reuse = self.controller.decide(call.info.step, lfd)
        if after_warmup:
            self.backoff.record(reuse)
        return reuse

    def trial_lfd(self, call: ForwardCall, cached: torch.Tensor) -> float:
        """LFD between a trial forward on the downsampled latent and the downsampled cached prediction."""
        return self.trial_lfds(call, [cached])[0]

    def trial_lfds(self, call: ForwardCall, predictions: list[torch.Tensor]) -> list[float]:
        """One trial forward on the downsampled latent; its LFD to each (downsampled) prediction."""
        adapter, model = self.adapter, self.model_view.model
        grid = adapter.grid(model, call.arguments)
        layout = adapter.latent_layout
        x5 = to_5d(call.hidden_states, layout, grid)
        factors = self.config.downsample or auto_downsample(
            tuple(x5.shape[2:]), adapter.patch(model), video=layout == "BCFHW"
        )
        # Decision statistics in float32: CPU has no bfloat16 / float16 avg_pool3d or FFT kernels, and half
        # precision would make the LFD coarse. The trial itself runs in the model's dtype.
        small5 = downsample(x5.float(), factors).to(x5.dtype)
        small_grid = dataclasses.replace(grid, frames=small5.shape[2], height=small5.shape[3], width=small5.shape[4])
        overrides: dict[str, Any] = {adapter.hidden_states_arg: from_5d(small5, layout)}
        if adapter.resized_kwargs is not None:
            overrides.update(adapter.resized_kwargs(call.arguments, small_grid))
        trial = to_5d(call.run_trial(**overrides), layout, small_grid).float()
        trial_low = low_frequency(trial, self.config.radius)
        values = []
        for prediction in predictions:
            # fetch: a cache kept in another dtype / on another device (cache_dtype / cache_device) comes back
            cached = downsample(to_5d(call.fetch(prediction), layout, grid).float(), factors)
            cached_low = low_frequency(cached, self.config.radius)
            # the trial's output is whole on every rank under context parallelism, rows under data parallelism
            value = call.decisions.vector_norm(trial_low - cached_low, model_level=True)
            values.append(value if math.isfinite(value) else float("inf"))  # non-finite trial: compute the step
        return values

    # ------------------------------------------------------------------ BlockCache
    def _plan_blocks(self, state: PreciseCacheState) -> None:
        if not self.uses_block_hooks:
            return
        if state.skip and state.uses_left > 0:
            state.block_pass = BlockPass.PARTIAL
            state.uses_left -= 1
        else:
            state.block_pass = BlockPass.FULL

    def _after_blocks(self, state: PreciseCacheState) -> None:
        if not self.uses_block_hooks or state.block_pass is not BlockPass.FULL or not state.change:
            return
        count = int(round(self.config.block_cache_ratio * self.model_view.num_blocks))
        ranked = sorted(state.change, key=state.change.get)
        state.skip = set(ranked[:count])
        state.uses_left = self.config.block_cache_steps

    def block(self, call: BlockCall) -> Any:
        state: PreciseCacheState = call.forward.state
        position = call.ref.position
        if state.block_pass is BlockPass.PARTIAL and position in state.skip and position in state.residuals:
            history = state.histories.get(position)
            return call.skip(self.forecaster.predict(history, call.info.step, state.residuals[position]))
        inputs = call.inputs()
        output = call.run()
        if state.block_pass is BlockPass.FULL:
            residuals = call.forward.store(call.residuals(inputs, call.outputs_of(output)))
            state.residuals[position] = residuals
            self.forecaster.remember_at(call.forward, state.histories, position, call.info.step, residuals)
            state.change[position] = call.forward.decisions.norm(residuals.values())  # a shard under CP
        return output


register_preset("precisecache-base", lambda: PreciseCacheConfig(alpha=0.5), "PreciseCache LFCache, alpha 0.5")
register_preset("precisecache-turbo", lambda: PreciseCacheConfig(alpha=0.7), "PreciseCache LFCache, alpha 0.7")
for _speed, _share in (("2x", 0.5), ("3x", 0.67)):
    register_preset(
        f"precisecache-{_speed}",
        lambda share=_share: PreciseCacheConfig(target_reuse=share),
        f"PreciseCache LFCache with delta calibrated on the model to reuse ~{_share:.0%} of the steps "
        "(needs `ditcache.calibrate(..., 'precisecache')`)",
    )
register_preset(
    "precisecache-flash",
    lambda: PreciseCacheConfig(alpha=0.7, block_cache_ratio=0.4, block_cache_steps=3),
    "PreciseCache turbo + BlockCache (40% of blocks cached, L = 3)",
)
