"""MixCache offline profiling: theta, delta1, delta2, mu/sigma of cache distances, and impacts.

1. Full sampling of `samples` prompts (classes), recording every step's cond / uncond outputs and the
   outputs of the candidate blocks.
2. theta: D_step (relative L1 of consecutive cond outputs) has stabilised at the first step t >= 5 whose
   value is within 10% of the mean of the five before; theta is the mean of D_step from there on,
   delta1 / delta2 its minimum / maximum there (each averaged over prompts).
3. mu / sigma of the distance tensor between the cached and the real output, per granularity (step:
   O_t - O_t-1; cfg: c_t + (u - c)_t-1 - u_t; block: B_t - B_t-1): mu = mean over steps after the warm-up,
   sigma = mean of the per-step standard deviations of the last 80% of the steps.
4. Impact: Gaussian perturbation N(mu, sigma) of what each granularity approximates, measured as the
   relative L1 change of the guided prediction: step (both branches' outputs), cfg (the uncond output),
   block i (block i's output, then the later blocks run; per step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..config import PolicyConfig
from ..engine.calls import BlockCall, ForwardCall, sample_of
from ..numerics import rel_l1
from ..policies.base import Policy
from ..registry import register_policy
from .profiles import Profile, model_fingerprint

DEFAULT_CANDIDATES = (0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class MixCacheRecordConfig(PolicyConfig):
    """Internal: compute everything, record outputs and candidate block outputs per step and branch."""

    positions: tuple[int, ...] = ()


@register_policy(MixCacheRecordConfig)
class MixCacheRecordPolicy(Policy):
    uses_block_hooks = True

    def __init__(self, config: MixCacheRecordConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.blocks: dict[tuple[str, int, int], torch.Tensor] = {}

    def forward(self, call: ForwardCall) -> Any:
        output = call.run()
        self.outputs[(call.info.branch, call.info.step)] = sample_of(output).detach().clone()
        return output

    def block(self, call: BlockCall) -> Any:
        output = call.run()
        if call.ref.position in self.config.positions:
            hidden = call.outputs_of(output)["hidden_states"]
            self.blocks[(call.forward.info.branch, call.forward.info.step, call.ref.position)] = hidden.detach().clone()
        return output


@dataclasses.dataclass(frozen=True)
class BlockPerturbConfig(PolicyConfig):
    """Internal: add N(mu, sigma) noise to the hidden-state output of one block."""

    position: int = 0
    mu: float = 0.0
    sigma: float = 0.0
    seed: int = 0


@register_policy(BlockPerturbConfig)
class BlockPerturbPolicy(Policy):
    uses_block_hooks = True

    def block(self, call: BlockCall) -> Any:
        output = call.run()
        if call.ref.position != self.config.position:
            return output
        values = call.outputs_of(output)
        hidden = values["hidden_states"]
        generator = torch.Generator().manual_seed(self.config.seed + call.forward.info.step)
        noise = torch.randn(hidden.shape, generator=generator) * self.config.sigma + self.config.mu
        values["hidden_states"] = hidden + noise.to(hidden.dtype)
        return call.build_output(values)


def candidate_positions(num_blocks: int, fractions: tuple[float, ...] = DEFAULT_CANDIDATES) -> tuple[int, ...]:
    """Block i feeds block i + 1, so candidates stop one short of the last block."""
    return tuple(sorted({min(num_blocks - 2, max(0, round(f * num_blocks) - 1)) for f in fractions}))


def stabilised_from(d: list[float], window: int = 5, tol: float = 0.1) -> int:
    for t in range(window, len(d)):
        mean = float(np.mean(d[t - window : t]))
        if mean > 0 and abs(d[t] - mean) <= tol * mean:
            return t
    return max(1, len(d) // 5)


def _gauss_like(x: torch.Tensor, mu: float, sigma: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=generator) * sigma + mu


def calibrate(
    pipe: Any,
    model_name: str,
    steps: int = 50,
    samples: int = 8,
    seed: int = 1,
    guidance: float = 4.0,
    fractions: tuple[float, ...] = DEFAULT_CANDIDATES,
) -> Profile:
    from .. import apply

    num_blocks = sum(len(getattr(pipe.transformer, s.attr)) for s in _adapter(pipe).block_lists)
    positions = candidate_positions(num_blocks, fractions)
    labels = torch.arange(samples) % pipe.spec.num_classes
    handle = apply(pipe, MixCacheRecordConfig(positions=positions))
    try:
        _, trajectory = pipe(
            labels, num_inference_steps=steps, guidance_scale=guidance, seed=seed, return_trajectory=True
        )
        record = handle.policy
        outputs, blocks = dict(record.outputs), dict(record.blocks)
    finally:
        handle.remove()

    cond = [outputs[("cond", t)] for t in range(steps)]
    uncond = [outputs[("uncond", t)] for t in range(steps)]
    guided = [u + guidance * (c - u) for c, u in zip(cond, uncond)]
    # theta, delta1, delta2 per prompt (sample), averaged.
    thetas, lows, highs, starts = [], [], [], []
    for i in range(samples):
        d = [rel_l1(cond[t][i], cond[t - 1][i]) for t in range(1, steps)]
        start = stabilised_from(d)
        tail = d[start:] or d[-1:]
        thetas.append(float(np.mean(tail)))
        lows.append(float(np.min(tail)))
        highs.append(float(np.max(tail)))
        starts.append(start + 1)
    warm = int(np.median(starts))

    def stats(diffs: list[torch.Tensor]) -> tuple[float, float]:
        mus = [float(x.mean()) for x in diffs]
        sigmas = [float(x.std()) for x in diffs[len(diffs) // 5 :]]
        return float(np.mean(mus)), float(np.mean(sigmas))

    mu_step, sigma_step = stats([cond[t] - cond[t - 1] for t in range(warm, steps)])
    mu_cfg, sigma_cfg = stats([cond[t] + (uncond[t - 1] - cond[t - 1]) - uncond[t] for t in range(warm, steps)])
    impact_step = float(
        np.mean(
            [
                rel_l1(
                    (uncond[t] + _gauss_like(uncond[t], mu_step, sigma_step, 2 * t))
                    + guidance
                    * (
                        (cond[t] + _gauss_like(cond[t], mu_step, sigma_step, 2 * t + 1))
                        - (uncond[t] + _gauss_like(uncond[t], mu_step, sigma_step, 2 * t))
                    ),
                    guided[t],
                )
                for t in range(warm, steps)
            ]
        )
    )
    impact_cfg = float(
        np.mean(
            [
                rel_l1(
                    (uncond[t] + _gauss_like(uncond[t], mu_cfg, sigma_cfg, t))
                    + guidance * (cond[t] - uncond[t] - _gauss_like(uncond[t], mu_cfg, sigma_cfg, t)),
                    guided[t],
                )
                for t in range(warm, steps)
            ]
        )
    )

    impact_block: dict[str, list[float]] = {}
    block_stats: dict[str, tuple[float, float]] = {}
    pipe.scheduler.set_timesteps(steps)
    sigmas = pipe.scheduler.sigmas
    null = torch.full_like(labels, pipe.spec.null_class)
    for position in positions:
        mu_b, sigma_b = stats(
            [blocks[("cond", t, position)] - blocks[("cond", t - 1, position)] for t in range(warm, steps)]
        )
        block_stats[str(position)] = (mu_b, sigma_b)
        handle = apply(pipe, BlockPerturbConfig(position=position, mu=mu_b, sigma=sigma_b, seed=seed))
        impacts = []
        try:
            with torch.no_grad(), handle.generation(num_steps=steps):
                for t in range(steps):
                    sigma = sigmas[t].expand(samples)
                    with handle.branch("cond", step_index=t):
                        c = pipe.model.predict(trajectory[t], sigma, labels)
                    with handle.branch("uncond", step_index=t):
                        u = pipe.model.predict(trajectory[t], sigma, null)
                    impacts.append(rel_l1(u + guidance * (c - u), _pixels(pipe, guided[t])))
        finally:
            handle.remove()
        impact_block[str(position)] = impacts

    return Profile(
        method="mixcache",
        model_name=model_name,
        fingerprint=model_fingerprint(pipe.transformer),
        num_steps=steps,
        data={
            "samples": samples,
            "seed": seed,
            "guidance": guidance,
            "warmup_steps": warm,
            "theta": float(np.mean(thetas)),
            "delta1": float(np.mean(lows)),
            "delta2": float(np.mean(highs)),
            "mu_sigma": {"step": [mu_step, sigma_step], "cfg": [mu_cfg, sigma_cfg], "block": block_stats},
            "impact_step": impact_step,
            "impact_cfg": impact_cfg,
            "impact_block": impact_block,
            "block_candidates": list(fractions),
        },
    )


def _adapter(pipe: Any) -> Any:
    from ..adapters import adapter_for

    return adapter_for(pipe.transformer)


def _pixels(pipe: Any, model_output: torch.Tensor) -> torch.Tensor:
    return pipe.model.from_model_output(model_output)
