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
from ..policies.base import Policy
from ..policies.omnicache_trajectory import SubmoduleCacheState, SubmodulePass, reuse_or_store_submodule
from ..registry import register_policy
from .profiles import Profile, model_fingerprint
from .trajectory import curvature, project_3d, select_reuse_steps

SPEED_FRACTIONS = {"slow": 0.5, "fast": 0.6}


@dataclasses.dataclass(frozen=True)
class OmniCacheCalibrationConfig(PolicyConfig):
    """Internal: measure q_t at every step without reusing anything."""


@register_policy(OmniCacheCalibrationConfig)
class OmniCacheCalibrationPolicy(Policy):
    branch_state = SubmoduleCacheState
    uses_submodule_hooks = True

    def reset(self) -> None:
        self.q: dict[tuple[str, int], torch.Tensor] = {}

    def __init__(self, config: PolicyConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.reset()

    def forward(self, call: ForwardCall) -> Any:
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


def trajectory_curvature(trajectory: list[torch.Tensor]) -> np.ndarray:
    """Mean over samples of the per-step curvature of x_t (list of N+1 batched states)."""
    stacked = torch.stack([x.float() for x in trajectory], dim=1)  # (B, N+1, ...)
    per_sample = [curvature(project_3d(sample.flatten(1).numpy())) for sample in stacked]
    steps = len(trajectory) - 1
    return np.mean([c[:steps] for c in per_sample], axis=0)  # curvature at x_s for step s (x_s -> x_s+1)


def calibrate(
    pipe: Any, model_name: str, steps: int = 50, samples: int = 8, seed: int = 0, guidance: float = 4.0, warmup: int = 2
) -> Profile:
    from .. import apply

    labels = torch.arange(samples) % pipe.spec.num_classes
    handle = apply(pipe, OmniCacheCalibrationConfig())
    try:
        _, trajectory = pipe(
            labels, num_inference_steps=steps, guidance_scale=guidance, seed=seed, return_trajectory=True
        )
        q = dict(handle.policy.q)
    finally:
        handle.remove()
    meta = {"samples": samples, "seed": seed, "guidance": guidance}
    return build_profile(pipe.transformer, model_name, q, trajectory, steps, warmup, meta)


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
    if len(trajectory) != steps + 1:
        raise ValueError(f"trajectory must hold steps + 1 = {steps + 1} states, got {len(trajectory)}")
    gamma = noise_gamma(q, steps)
    step_curvature = trajectory_curvature(trajectory)
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
