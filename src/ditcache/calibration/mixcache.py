"""MixCache offline profiling: theta, delta1, delta2, mu/sigma of cache distances, and impacts.

1. One generation (any sampler: see `record.py`), recording every step's cond / uncond outputs, the model
   inputs and the outputs of the candidate blocks.
2. theta: D_step (relative L1 of consecutive cond outputs) has stabilised at the first step t >= 5 whose
   value is within 10% of the mean of the five before; theta is the mean of D_step from there on,
   delta1 / delta2 its minimum / maximum there (each averaged over prompts).
3. mu / sigma of the distance tensor between the cached and the real output, per granularity (step:
   O_t - O_t-1; cfg: c_t + (u - c)_t-1 - u_t; block: B_t - B_t-1): mu = mean over steps after the warm-up,
   sigma = mean of the per-step standard deviations of the last 80% of the steps.
4. Impact: Gaussian perturbation N(mu, sigma) of what each granularity approximates, measured as the
   relative L1 change of the guided prediction: step (both branches' outputs), cfg (the uncond output),
   block i (block i's output, then the later blocks run; per step, in a replay of the same generation whose
   forwards get the recorded inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..adapters import adapter_for
from ..config import PolicyConfig
from ..engine.calls import BlockCall, ForwardCall
from ..numerics import rel_l1
from ..registry import register_policy
from .profiles import Profile, model_fingerprint
from .record import CalibrationRun, RecordingPolicy, branches, record

DEFAULT_CANDIDATES = (0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class MixCacheRecordConfig(PolicyConfig):
    """Internal: compute everything, record inputs, outputs and candidate block outputs per step and branch."""

    positions: tuple[int, ...] = ()


@register_policy(MixCacheRecordConfig)
class MixCacheRecordPolicy(RecordingPolicy):
    uses_block_hooks = True

    def __init__(self, config: MixCacheRecordConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.blocks: dict[tuple[str, int, int], torch.Tensor] = {}

    def block(self, call: BlockCall) -> Any:
        output = call.run()
        if call.ref.position in self.config.positions:
            hidden = call.outputs_of(output)[call.ref.spec.token_stream]
            self.blocks[(call.forward.info.branch, call.forward.info.step, call.ref.position)] = hidden.detach().clone()
        return output


@dataclasses.dataclass(frozen=True)
class BlockPerturbConfig(PolicyConfig):
    """Internal: replay recorded model inputs and add N(mu, sigma) noise to one block's image-token output."""

    position: int = 0
    mu: float = 0.0
    sigma: float = 0.0
    seed: int = 0


@register_policy(BlockPerturbConfig)
class BlockPerturbPolicy(RecordingPolicy):
    uses_block_hooks = True

    def __init__(self, config: BlockPerturbConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.replay: dict[tuple[str, int], torch.Tensor] = {}  # (branch, step) -> recorded model input

    def compute(self, call: ForwardCall) -> Any:
        # Teacher forcing: every forward sees the input of the unperturbed run, whatever the sampler did.
        recorded = self.replay[(call.info.branch, call.info.step)]
        return call.run(**{self.adapter.hidden_states_arg: recorded})

    def block(self, call: BlockCall) -> Any:
        output = call.run()
        if call.ref.position != self.config.position:
            return output
        values = call.outputs_of(output)
        stream = call.ref.spec.token_stream
        hidden = values[stream]
        generator = torch.Generator().manual_seed(self.config.seed + call.forward.info.step)
        noise = torch.randn(hidden.shape, generator=generator) * self.config.sigma + self.config.mu
        values[stream] = hidden + noise.to(hidden.dtype)
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


def _mu_sigma(diffs: list[torch.Tensor]) -> tuple[float, float]:
    """mu: mean over the listed steps; sigma: mean of per-step standard deviations of the last 80%."""
    mus = [float(x.mean()) for x in diffs]
    sigmas = [float(x.std()) for x in diffs[len(diffs) // 5 :]]
    return float(np.mean(mus)), float(np.mean(sigmas))


def _thresholds(cond: list[torch.Tensor]) -> tuple[float, float, float, int]:
    """theta, delta1, delta2 (averaged over samples) and the warm-up length."""
    thetas, lows, highs, starts = [], [], [], []
    for i in range(cond[0].shape[0]):
        d = [rel_l1(cond[t][i], cond[t - 1][i]) for t in range(1, len(cond))]
        start = stabilised_from(d)
        tail = d[start:] or d[-1:]
        thetas.append(float(np.mean(tail)))
        lows.append(float(np.min(tail)))
        highs.append(float(np.max(tail)))
        starts.append(start + 1)
    return float(np.mean(thetas)), float(np.mean(lows)), float(np.mean(highs)), int(np.median(starts))


def calibrate(
    model: torch.nn.Module,
    generation: CalibrationRun,
    model_name: str | None = None,
    seed: int = 1,
    fractions: tuple[float, ...] = DEFAULT_CANDIDATES,
) -> Profile:
    """MixCache profile of `model` from one recorded generation plus one replayed generation per candidate
    block (perturbed). Works with separate "cond"/"uncond" forwards (CFG granularity profiled) or a single
    unnamed branch (no CFG: the CFG impact is 0 and the policy disables that granularity)."""
    steps = generation.num_steps
    num_blocks = sum(len(getattr(model, spec.attr)) for spec in adapter_for(model).block_lists)
    positions = candidate_positions(num_blocks, fractions)
    recorder, _ = record(model, MixCacheRecordConfig(positions=positions), generation)
    cond_branch, uncond_branch = branches(recorder.outputs)
    if uncond_branch is not None and generation.guidance is None:
        raise ValueError("the generation runs an unconditional branch: give its CFG scale as guidance=")
    guidance = generation.guidance if uncond_branch is not None else 1.0
    cond = [recorder.outputs[(cond_branch, t)] for t in range(steps)]
    uncond = [recorder.outputs[(uncond_branch, t)] for t in range(steps)] if uncond_branch else cond
    guided = [u + guidance * (c - u) for c, u in zip(cond, uncond)]
    theta, delta1, delta2, warm = _thresholds(cond)
    late = range(warm, steps)

    mu_step, sigma_step = _mu_sigma([cond[t] - cond[t - 1] for t in late])
    mu_cfg, sigma_cfg = _mu_sigma([cond[t] + (uncond[t - 1] - cond[t - 1]) - uncond[t] for t in late])

    def step_impact(t: int) -> float:
        noisy_u = uncond[t] + _gauss_like(uncond[t], mu_step, sigma_step, 2 * t)
        noisy_c = cond[t] + _gauss_like(cond[t], mu_step, sigma_step, 2 * t + 1)
        return rel_l1(noisy_u + guidance * (noisy_c - noisy_u) if uncond_branch else noisy_c, guided[t])

    def cfg_impact(t: int) -> float:
        noise = _gauss_like(uncond[t], mu_cfg, sigma_cfg, t)
        return rel_l1((uncond[t] + noise) + guidance * (cond[t] - uncond[t] - noise), guided[t])

    impact_step = float(np.mean([step_impact(t) for t in late]))
    impact_cfg = float(np.mean([cfg_impact(t) for t in late])) if uncond_branch else 0.0

    impact_block: dict[str, list[float]] = {}
    block_stats: dict[str, tuple[float, float]] = {}
    for position in positions:
        recorded = recorder.blocks
        mu_b, sigma_b = _mu_sigma(
            [recorded[(cond_branch, t, position)] - recorded[(cond_branch, t - 1, position)] for t in late]
        )
        block_stats[str(position)] = (mu_b, sigma_b)
        config = BlockPerturbConfig(position=position, mu=mu_b, sigma=sigma_b, seed=seed)
        perturbed, _ = record(model, config, generation, prepare=lambda p: p.replay.update(recorder.inputs))
        impacts = []
        for t in range(steps):
            c = perturbed.outputs[(cond_branch, t)]
            u = perturbed.outputs[(uncond_branch, t)] if uncond_branch else c
            impacts.append(rel_l1(u + guidance * (c - u), guided[t]))
        impact_block[str(position)] = impacts

    return Profile(
        method="mixcache",
        model_name=model_name or type(model).__name__,
        fingerprint=model_fingerprint(model),
        num_steps=steps,
        data={
            **generation.meta,
            "samples": cond[0].shape[0],
            "seed": seed,
            "guidance": guidance,
            "cfg_branches": uncond_branch is not None,
            "warmup_steps": warm,
            "theta": theta,
            "delta1": delta1,
            "delta2": delta2,
            "mu_sigma": {"step": [mu_step, sigma_step], "cfg": [mu_cfg, sigma_cfg], "block": block_stats},
            "impact_step": impact_step,
            "impact_cfg": impact_cfg,
            "impact_block": impact_block,
            "block_candidates": list(fractions),
        },
    )
