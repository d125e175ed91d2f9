"""OmniCache, trajectory-oriented (paper 002): curvature-scheduled reuse with cache-noise correction.

Calibration (`ditcache calibrate omnicache-trajectory`, see `calibration/omnicache.py`) measures the sampling
trajectory's curvature in a 3-D projection and picks the reuse steps among the lowest-curvature ones
(never three in a row), and estimates gamma_t, the correlation of the cache-induced noise between
consecutive steps. At sampling time:

- at a reuse step every block's attention and MLP outputs are replaced by those cached at the last
  computed step (the rest of the block, the embedders and the final layer still run);
- the cache-induced noise is estimated and subtracted: q_t ~ gamma_t * q_prev, where q_prev is measured at
  the computed step just before (a cheap extra pass with cached attention/MLP minus the real output) and
  chained through consecutive reuse steps (Eq. 9);
- the correction is low-pass filtered in the first `filter_switch` share of the steps and high-pass
  filtered after (early steps shape low frequencies, late steps details).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, ClassVar

import torch

from ..calibration.profiles import Profile, ProfileMismatchError, find_profile
from ..config import PolicyConfig, check_bool, check_choice, check_float
from ..engine.calls import ForwardCall, SubmoduleCall, sample_of
from ..engine.forecast import COPY, FEATURE_FORECASTS, Forecaster, History, check_forecast
from ..engine.latents import from_5d, to_5d
from ..engine.state import BranchState
from ..numerics import frequency_split
from ..registry import register_policy, register_preset
from .base import Policy

METHOD = "omnicache-trajectory"
SPEEDS = ("slow", "fast")


@dataclasses.dataclass(frozen=True)
class OmniCacheTrajectoryConfig(PolicyConfig):
    r"""
    OmniCache (trajectory-oriented): reuse attention / MLP outputs at low-curvature steps, with noise correction.

    A calibration (`ditcache calibrate omnicache-trajectory`) projects the sampling trajectory to 3-D, picks
    the reuse steps among the lowest-curvature ones (never three in a row; "slow" and "fast" schedules) and
    estimates gamma_t, the correlation of the cache-induced noise between consecutive steps. At a reuse step
    every block's attention and MLP submodules return their outputs cached at the last computed step (the
    rest of the block, the embedders and the final layer still run). With `correction`, the cache-induced
    noise q_t ~ gamma_t x q_prev (q_prev measured by one cheap extra pass at the computed step just before,
    chained through consecutive reuse steps) is subtracted from the output, low-pass filtered in the first
    `filter_switch` share of the steps and high-pass filtered after (`filtering`). Applying needs a profile
    tied to the model and the step count. Presets `omnicache-traj-slow` and `omnicache-traj-fast`.

    Paper: "OmniCache: A Trajectory-Oriented Global Perspective on Training-Free Cache Reuse for Diffusion
    Transformer Models", Chu et al., 2025 (arXiv:2508.16212).

    Args:
        speed (`str`, defaults to `"slow"`):
            Which schedule of the profile: `"slow"` (50% of the steps reused) or `"fast"` (60%).
        profile (`str`, *optional*, defaults to `None`):
            Path of a profile JSON; `None` = the shipped profile matching the model and the step count.
        correction (`bool`, defaults to `True`):
            Subtract the estimated cache-induced noise (costs one cheap extra pass before each reuse run).
        filtering (`bool`, defaults to `True`):
            Low-pass the correction early, high-pass it late; `False` subtracts it unfiltered.
        filter_switch (`float`, defaults to `0.5`):
            Share of the steps after which the filter switches to high-pass, in [0, 1].
        filter_radius (`float`, defaults to `0.25`):
            Cut-off radius as a share of min(H, W) of the latent grid, in (0, 1].
        forecast (`str`, defaults to `"copy"`):
            How reused attention / MLP outputs are made from the computed steps: `"copy"` (the last one, the
            paper), `"taylor1"`, `"taylor2"` or `"hermite"` (see docs/METHODS.md, "Forecasting").

    Example:
        >>> import ditcache
        >>> config = ditcache.OmniCacheTrajectoryConfig(speed="fast")
        >>> config == ditcache.preset("omnicache-traj-fast")
        True
        >>> config.replace(correction=False).correction
        False
        >>> ditcache.OmniCacheTrajectoryConfig.profile_method  # applying needs a profile of this method
        'omnicache-trajectory'
    """

    profile_method: ClassVar[str] = METHOD  # needs a calibration profile of this method
    speed: str = "slow"  # which schedule of the profile: "slow" (50% of steps reused) or "fast" (60%)
    profile: str | None = None  # path of a profile JSON; None = the shipped profile matching the model
    correction: bool = True  # subtract the estimated cache-induced noise
    filtering: bool = True  # low-pass the correction early, high-pass it late
    filter_switch: float = 0.5  # share of the steps after which the filter switches to high-pass
    filter_radius: float = 0.25  # cut-off radius as a share of min(H, W) of the latent grid
    forecast: str = "copy"  # how reused attention / MLP outputs are made from the computed steps

    def __post_init__(self) -> None:
        check_choice("speed", self.speed, SPEEDS)
        if self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"profile must be None or a path string, got {self.profile!r}")
        check_bool("correction", self.correction)
        check_bool("filtering", self.filtering)
        check_float("filter_switch", self.filter_switch, 0.0, 1.0)
        check_float("filter_radius", self.filter_radius, 0.0, 1.0, low_open=True)
        check_forecast(self.forecast, FEATURE_FORECASTS, "OmniCache reuses attention / MLP outputs")


class SubmodulePass(enum.Enum):
    COMPUTE = "compute"  # submodules run and their outputs are cached
    REUSE = "reuse"  # submodules return the outputs cached at the last computed pass


@dataclasses.dataclass
class SubmoduleCacheState(BranchState):
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # submodule name -> cached output
    histories: dict[str, History] = dataclasses.field(default_factory=dict)  # submodule name -> forecast input
    q: torch.Tensor | None = None  # cache-induced noise measured at the last computed step (chained)
    submodule_pass: SubmodulePass = SubmodulePass.COMPUTE


def reuse_or_store_submodule(call: SubmoduleCall, forecaster: Forecaster = COPY) -> Any:
    """Shared with calibration: in a reuse pass return the cached output (or its forecast), in a compute pass
    cache it."""
    state: SubmoduleCacheState = call.forward.state
    name, step = call.ref.name, call.forward.info.step
    if state.submodule_pass is SubmodulePass.REUSE and name in state.outputs:
        return call.reuse(forecaster.predict(state.histories.get(name), step, state.outputs[name]))
    output = call.run()
    if state.submodule_pass is SubmodulePass.COMPUTE:
        stored = call.forward.store(output)
        state.outputs[name] = forecaster.remember_at(call.forward, state.histories, name, step, stored)
    return output


@dataclasses.dataclass(frozen=True)
class TrajectoryProfileData:
    """What an OmniCache (trajectory) profile holds, validated against the generation's step count."""

    schedules: dict[str, tuple[int, ...]]  # speed -> reuse steps
    gamma: list[float]  # noise correlation per step

    @classmethod
    def from_dict(cls, data: dict[str, Any], num_steps: int) -> TrajectoryProfileData:
        schedules, gamma = data.get("schedules"), data.get("gamma")
        if not isinstance(schedules, dict) or set(SPEEDS) - set(schedules):
            raise ProfileMismatchError(f"profile schedules must name the speeds {SPEEDS}, got {schedules!r:.80}")
        for speed, steps in schedules.items():
            if not isinstance(steps, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < num_steps for s in steps
            ):
                raise ProfileMismatchError(f"profile schedule {speed!r} must list step indices in [0, {num_steps})")
        if (
            not isinstance(gamma, list)
            or len(gamma) != num_steps
            or not all(isinstance(g, (int, float)) and math.isfinite(g) for g in gamma)
        ):
            raise ProfileMismatchError(f"profile gamma must be {num_steps} finite numbers")
        return cls({k: tuple(v) for k, v in schedules.items()}, [float(g) for g in gamma])


@register_policy(OmniCacheTrajectoryConfig)
class OmniCacheTrajectoryPolicy(Policy):
    branch_state = SubmoduleCacheState
    uses_submodule_hooks = True
    requires = ("submodule_hooks",)

    def __init__(self, config: OmniCacheTrajectoryConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self._given = Profile.load(config.profile) if config.profile else None
        self.profile: Profile | None = None
        self.forecaster = Forecaster.of(config.forecast)
        self.reset()

    def reset(self) -> None:
        self.reuse_steps: frozenset[int] = frozenset()
        self.gamma: list[float] = []
        self.num_steps: int | None = None

    def _prepare(self, call: ForwardCall) -> None:
        num_steps = call.info.num_steps
        if num_steps is None:
            raise ValueError("OmniCache needs the number of steps: use a pipeline or handle.generation(num_steps=...)")
        if self.num_steps == num_steps:
            return
        model = self.model_view.model
        profile = self._given or find_profile(self.config.profile_method, model, num_steps)
        profile.check(self.config.profile_method, model, num_steps)
        self.profile = profile
        data = TrajectoryProfileData.from_dict(profile.data, num_steps)
        self.reuse_steps = frozenset(data.schedules[self.config.speed])
        self.gamma = data.gamma
        self.num_steps = num_steps

    def forward(self, call: ForwardCall) -> Any:
        self._prepare(call)
        step, state, config = call.info.step, call.state, self.config
        have_cache = len(state.outputs) == len(self.model_view.submodules)
        if step in self.reuse_steps and have_cache:
            state.submodule_pass = SubmodulePass.REUSE
            output = call.run()
            if not (config.correction and state.q is not None):
                return output
            state.q = call.store(self.gamma[step] * state.q)
            return call.wrap(sample_of(output) - self._filtered(call.fetch(state.q), call))
        approx = None
        if config.correction and step + 1 in self.reuse_steps and have_cache:
            state.submodule_pass = SubmodulePass.REUSE  # cheap pass with cached attention / MLP: q at this step
            approx = sample_of(call.run())
        state.submodule_pass = SubmodulePass.COMPUTE
        output = call.run()
        state.q = call.store(approx - sample_of(output)) if approx is not None else None
        return output

    def _filtered(self, q: torch.Tensor, call: ForwardCall) -> torch.Tensor:
        if not self.config.filtering:
            return q
        layout = self.adapter.latent_layout
        grid = self.adapter.grid(self.model_view.model, call.arguments)
        # The FFT in float32: CPU has no half-precision FFT, and the correction goes back in the model's dtype.
        low, high = frequency_split(to_5d(q, layout, grid).float(), self.config.filter_radius)
        early = call.info.step < self.config.filter_switch * self.num_steps
        return from_5d(low if early else high, layout).to(q.dtype)

    def submodule(self, call: SubmoduleCall) -> Any:
        return reuse_or_store_submodule(call, self.forecaster)


register_preset(
    "omnicache-traj-slow",
    lambda: OmniCacheTrajectoryConfig(speed="slow"),
    "OmniCache trajectory: reuse 50% of steps (shipped profile), noise correction + filtering",
)
register_preset(
    "omnicache-traj-fast",
    lambda: OmniCacheTrajectoryConfig(speed="fast"),
    "OmniCache trajectory: reuse 60% of steps (shipped profile), noise correction + filtering",
)
