"""TeaCache-style baseline: accumulated relative L1 change of the first block's modulated input.

At every forward, before the first block runs, the timestep-modulated input of that block (the adapter
says how to get it; it costs one norm) is compared with the one of the last forward of the same branch:
rel_l1 = mean|m_t - m_prev| / mean|m_prev|. The values are accumulated (optionally through TeaCache's
rescaling polynomial); below `threshold` every block is skipped by adding its residual cached at the last
computed step (the sum of per-block residuals is TeaCache's whole-stack residual); otherwise the step is
computed and the sum reset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..config import PolicyConfig, check_float, check_int
from ..engine.calls import BlockCall, ForwardCall
from ..engine.decisions import DecisionSync
from ..engine.forecast import FEATURE_FORECASTS, Forecaster, check_forecast
from ..engine.state import BranchState
from ..numerics import rel_l1
from ..registry import register_policy, register_preset
from .base import Policy, calibrated_threshold
from .block_segments import BlockSegments, skip_or_run_block


@dataclasses.dataclass(frozen=True)
class TeaCacheConfig(PolicyConfig):
    r"""
    TeaCache-style dynamic step skipping from the change of the first block's timestep-modulated input.

    Before the first block runs, its modulated input (the adapter says how to get it; it costs one norm) is
    compared with the one of the previous forward of the same CFG branch: rel-L1 = mean|m_t - m_prev| /
    mean|m_prev|. These values (optionally mapped through the `rescale` polynomial) are summed since the
    last computed step; while the sum stays below `threshold`, every block is skipped by adding its residual
    cached at the last computed step (the embedders and the final layer still run); otherwise the step is
    computed and the sum reset. Presets `teacache-0.05`, `teacache-0.1`, `teacache-0.2`, `teacache-0.3`.
    Needs an adapter with `modulated_input` (all shipped adapters have one; `apply` raises `TypeError`
    otherwise).

    Paper: "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", Liu et al., 2024
    (arXiv:2411.19108).

    Args:
        threshold (`float`, defaults to `0.1`):
            Accumulated rel-L1 under which steps skip their blocks, in [0, 100]; larger = more reuse, 0 never
            skips.
        warmup_steps (`int`, defaults to `1`):
            Steps before this index are always computed (their rel-L1 is recorded but not accumulated); >= 1.
        rescale (`tuple[float, ...]`, defaults to `()`):
            Coefficients, highest power first, of the polynomial applied to each rel-L1 before accumulating;
            a tuple of numbers, `()` = identity. TeaCache fits one per model; none is fitted for the
            reference models.
        target_reuse (`float | None`, defaults to `None`):
            Reuse about this share of the steps, in (0, 0.95]: the threshold is derived from the model's
            calibrated per-step rel-L1 (`ditcache.calibrate(model_or_pipe, "teacache", num_steps=...)`), so
            the speed is about the same on every model; `threshold` is then ignored. Presets `teacache-2x`
            (0.5) and `teacache-3x` (0.67). None = `threshold` as given.
        forecast (`str`, defaults to `"copy"`):
            How skipped blocks' residuals are made from the computed steps: `"copy"` (the last one),
            `"taylor1"`, `"taylor2"` or `"hermite"` (see docs/METHODS.md, "Forecasting").

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, ditcache.TeaCacheConfig(threshold=0.2))  # or "teacache-0.2"
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=4, handle=handle)
        >>> [step for step, branch, rel_l1 in handle.policy.trace]  # rel-L1 measured from step 1 on
        [1, 2, 3]
        >>> handle.remove()
    """

    profile_method: ClassVar[str] = "teacache"  # only read with target_reuse set
    threshold: float = 0.1  # accumulated rel-L1 under which steps are reused
    warmup_steps: int = 1
    # Coefficients (highest power first) of the polynomial applied to each rel-L1 before accumulating;
    # () means identity. TeaCache fits one per model; none is fitted for the reference models.
    rescale: tuple[float, ...] = ()
    # Reuse this share of the steps, with the threshold calibrated on the model (`ditcache.calibrate(...,
    # "teacache")`); None = use `threshold` as given.
    target_reuse: float | None = None
    forecast: str = "copy"  # how skipped blocks' residuals are made from the computed steps

    def __post_init__(self) -> None:
        check_float("threshold", self.threshold, 0.0, 100.0)
        check_forecast(self.forecast, FEATURE_FORECASTS, "TeaCache reuses block residuals")
        if self.target_reuse is not None:
            check_float("target_reuse", self.target_reuse, 0.0, 0.95, low_open=True)
        check_int("warmup_steps", self.warmup_steps, 1)
        if not isinstance(self.rescale, tuple) or not all(isinstance(c, (int, float)) for c in self.rescale):
            raise ValueError(f"rescale must be a tuple of numbers, got {self.rescale!r}")


@dataclasses.dataclass
class TeaCacheState(BranchState):
    previous: torch.Tensor | None = None  # modulated input of the first block at the last forward
    accumulated: float = 0.0  # rel-L1 summed since the last computed forward
    segments: BlockSegments = dataclasses.field(default_factory=BlockSegments)  # the cached block residuals
    skip: bool = False  # the running forward skips every block


@register_policy(TeaCacheConfig)
class TeaCachePolicy(Policy):
    branch_state = TeaCacheState
    uses_block_hooks = True
    requires = ("modulated_input",)

    def __init__(self, config: TeaCacheConfig, adapter: Any) -> None:
        if adapter.modulated_input is None:
            raise TypeError(f"the {adapter.name} adapter has no modulated_input; TeaCache needs it")
        super().__init__(config, adapter)
        self.forecaster = Forecaster.of(config.forecast)
        self.reset()

    def reset(self) -> None:
        self.trace: list[tuple[int, str, float]] = []  # (step, branch, rel-L1) for analysis
        self.threshold: float = self.config.threshold

    def forward(self, call: ForwardCall) -> Any:
        if self.config.target_reuse is not None and call.info.step == 0:
            self.threshold = calibrated_threshold(self, call, self.config.target_reuse, self.config.warmup_steps)
        state: TeaCacheState = call.state
        state.skip = False
        state.segments.begin()
        output = call.run()
        state.segments.finish(call, self.forecaster)
        return output

    def rel_l1(self, current: torch.Tensor, previous: torch.Tensor, decisions: DecisionSync | None = None) -> float:
        """Rescaled rel-L1; through `decisions` (the forward's choke point) for a block's tensors, which are a
        rank's shard under context parallelism."""
        value = decisions.rel_l1(current, previous) if decisions is not None else rel_l1(current, previous)
        if self.config.rescale:
            value = float(sum(c * value**p for p, c in enumerate(reversed(self.config.rescale))))
        return value

    def block(self, call: BlockCall) -> Any:
        state: TeaCacheState = call.forward.state
        if call.ref.position == 0:
            modulated = self.adapter.modulated_input(call.ref.module, call.arguments).detach()
            previous, state.previous = state.previous, call.forward.store(modulated)
            complete = state.segments.complete(self.model_view.num_blocks)
            if previous is not None:
                change = self.rel_l1(modulated, previous, call.forward.decisions)
                self.trace.append((call.info.step, call.info.branch, change))
            if previous is not None and complete and call.info.step >= self.config.warmup_steps:
                state.accumulated += self.trace[-1][2]
                state.skip = state.accumulated < self.threshold
            if not state.skip:
                state.accumulated = 0.0
        return skip_or_run_block(call, state.skip, self.forecaster, state.segments)


for _speed, _share in (("2x", 0.5), ("3x", 0.67)):
    register_preset(
        f"teacache-{_speed}",
        lambda share=_share: TeaCacheConfig(target_reuse=share),
        f"TeaCache-style with the threshold calibrated on the model to reuse ~{_share:.0%} of the steps "
        "(needs `ditcache.calibrate(..., 'teacache')`)",
    )

for _t in (0.05, 0.1, 0.2, 0.3):
    register_preset(
        f"teacache-{_t}",
        lambda t=_t: TeaCacheConfig(threshold=t),
        f"TeaCache-style: skip all blocks while accumulated rel-L1 of the modulated input < {_t}",
    )
