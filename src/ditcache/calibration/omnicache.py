"""OmniCache (trajectory) calibration: trajectory curvature, noise correlation gamma, reuse schedules.

Runs full sampling with a calibration policy that, at every step after the first, also runs the cheap
pass with the previous step's attention / MLP outputs, so the cache-induced noise q_t (cheap pass minus
real output) is known at every step without changing the trajectory. gamma_t is the least-squares factor
of q_t on q_{t-1}; curvature comes from the recorded x_t projected to 3-D.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..config import PolicyConfig
from ..engine.calls import ForwardCall, SubmoduleCall, sample_of
from ..policies.omnicache_trajectory import SubmoduleCacheState, SubmodulePass, reuse_or_store_submodule
from ..registry import register_policy
from .profiles import Profile, model_fingerprint
from .record import CalibrationRun, RecordingPolicy, record, trajectory
from .trajectory import curvature, project_3d, select_reuse_steps

SPEED_FRACTIONS = {"slow": 0.5, "fast": 0.6}


@dataclasses.dataclass(frozen=True)
class OmniCacheCalibrationConfig(PolicyConfig):
    """Internal: measure q_t at every step without reusing anything."""


@register_policy(OmniCacheCalibrationConfig)
class OmniCacheCalibrationPolicy(RecordingPolicy):
    branch_state = SubmoduleCacheState
    uses_submodule_hooks = True

    def __init__(self, config: PolicyConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.q: dict[tuple[str, int], torch.Tensor] = {}

    def compute(self, call: ForwardCall) -> Any:
        state: SubmoduleCacheState = call.state
        approx = None
        if len(state.outputs) == len(self.model_view.submodules):
            state.submodule_pass = SubmodulePass.REUSE
            approx = sample_of(call.run())
        state.submodule_pass = SubmodulePass.COMPUTE
        output = call.run()
        if approx is not None:
            self.q[(call.info.branch, call.info.step)] = (approx - sample_of(output)).float()
        return output

    def submodule(self, call: SubmoduleCall) -> Any:
        return reuse_or_store_submodule(call)


def noise_gamma(q: dict[tuple[str, int], torch.Tensor], num_steps: int) -> list[float]:
    """gamma[s] = <q_s, q_{s-1}> / <q_{s-1}, q_{s-1}>, pooled over branches and samples; 0 where unknown."""
    gamma = [0.0] * num_steps
    branches = {branch for branch, _ in q}
    for s in range(num_steps):
        num = den = 0.0
        for branch in branches:
            if (branch, s) in q and (branch, s - 1) in q:
                num += float((q[(branch, s)] * q[(branch, s - 1)]).sum())
                den += float(q[(branch, s - 1)].pow(2).sum())
        gamma[s] = num / den if den > 0 else 0.0
    return gamma


def trajectory_curvature(trajectory: list[torch.Tensor], steps: int | None = None) -> np.ndarray:
    """Mean over samples of the per-step curvature of x_t (list of N+1 batched states, or N when the final
    state is unknown: the last step is then an end point, curvature inf)."""
    stacked = torch.stack([x.float() for x in trajectory], dim=1)  # (B, N+1, ...)
    per_sample = [curvature(project_3d(sample.flatten(1).numpy())) for sample in stacked]
    steps = len(trajectory) - 1 if steps is None else steps
    return np.mean([c[:steps] for c in per_sample], axis=0)  # curvature at x_s for step s (x_s -> x_s+1)


def calibrate(
    model: torch.nn.Module, generation: CalibrationRun, model_name: str | None = None, warmup: int = 2
) -> Profile:
    """OmniCache (trajectory) profile of `model` from one recorded generation: q at every step, and the
    trajectory from the model's inputs (plus the final latent when the generation returns it)."""
    recorder, result = record(model, OmniCacheCalibrationConfig(), generation)
    states = trajectory(recorder, result, generation.num_steps)
    meta = {**generation.meta, "samples": states[0].shape[0], "guidance": generation.guidance}
    name = model_name or type(model).__name__
    return build_profile(model, name, recorder.q, states, generation.num_steps, warmup, meta)


def build_profile(
    model: torch.nn.Module,
    model_name: str,
    q: dict[tuple[str, int], torch.Tensor],
    trajectory: list[torch.Tensor],
    steps: int,
    warmup: int = 2,
    meta: dict | None = None,
) -> Profile:
    """Profile from a calibration run's noise measurements and recorded states x_0..x_N (any sampler:
    flow matching or epsilon prediction, the geometry and q are taken as they come)."""
    if len(trajectory) not in (steps, steps + 1):
        raise ValueError(f"trajectory must hold steps + 1 = {steps + 1} states (or {steps}), got {len(trajectory)}")
    gamma = noise_gamma(q, steps)
    step_curvature = trajectory_curvature(trajectory, steps)
    schedules = {
        speed: list(select_reuse_steps(step_curvature, fraction, warmup)) for speed, fraction in SPEED_FRACTIONS.items()
    }
    return Profile(
        method="omnicache-trajectory",
        model_name=model_name,
        fingerprint=model_fingerprint(model),
        num_steps=steps,
        data={
            **(meta or {}),
            "curvature": [float(c) if np.isfinite(c) else None for c in step_curvature],
            "gamma": gamma,
            "schedules": schedules,
            "fractions": SPEED_FRACTIONS,
        },
    )
