"""Calibration generations from a dataset instead of the model's own samples.

TokenCache's Algorithm 1 trains on forward-noised data: clean latents x_0 from a dataset, one noise draw per
sample, and at every step t of the sampler the model sees x_t = noised(x_0, noise, t). `noised_data_run` builds
such a generation for any supported transformer (the forwards go through `ditcache.cache_context`, so the
recorder sees the usual (branch, step) keys); `ditcache.calibrate(model, "tokencache", run=gen.run, ...)` or
`train_tokencache(model, gen)` then train on it exactly as on the model's own trajectory.

Example (a Flux-class transformer, latents already VAE-encoded and packed like the pipeline packs them):
    >>> gen = noised_data_run(transformer, packed_latents, scheduler.timesteps, flow_noise,
    ...                       {"cond": cond_kwargs, "uncond": uncond_kwargs}, timestep_scale=1 / 1000)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..adapters import adapter_for
from .record import CalibrationRun

Noiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified flow in scheduler units (t in [0, 1000], 1000 = pure noise): (1 - s) x_0 + s noise, s = t / 1000."""
    sigma = float(t) / 1000.0
    return (1.0 - sigma) * x0 + sigma * noise


def ddpm_noise(scheduler: Any) -> Noiser:
    """DDPM / DDIM forward noising with `scheduler`'s alphas: sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""

    def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.add_noise(x0, noise, torch.as_tensor(t).long().reshape(1))

    return noised


def noised_data_run(
    model: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: Sequence[Any] | torch.Tensor,
    add_noise: Noiser,
    branches: Mapping[str, Mapping[str, Any]],
    *,
    timestep_scale: float = 1.0,
    guidance: float | None = None,
    seed: int = 0,
) -> CalibrationRun:
    """A calibration generation over dataset latents.

    Args:
        model: the transformer (any class `ditcache.supported_models()` lists).
        latents: clean latents x_0 in the transformer's `hidden_states` layout, batch first.
        timesteps: the sampler's timesteps in scheduler units, in sampling order (e.g. `scheduler.timesteps`
            after `set_timesteps(num_steps)`); one step per entry.
        add_noise: x_t from (x_0, noise, t), e.g. `flow_noise` or `ddpm_noise(scheduler)`.
        branches: CFG branch name -> the model's other arguments for that branch (text embeddings, class labels,
            position ids, ...), e.g. {"cond": {...}, "uncond": {...}}; one forward per branch and step.
        timestep_scale: multiplies t before it is passed to the model (Flux embeds sigma: 1 / 1000).
        guidance: the CFG scale stored with the profile (None: no CFG).
        seed: the noise draw.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim < 2:
        raise ValueError(f"latents must be a batched tensor in the model's hidden_states layout, got {latents!r:.80}")
    steps = list(timesteps)
    if not steps:
        raise ValueError("timesteps must hold at least one timestep")
    if not branches:
        raise ValueError("branches must name at least one branch, e.g. {'cond': {...model arguments...}}")
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    batch = latents.shape[0]

    def run() -> torch.Tensor:
        from ..api import cache_context

        for index, t in enumerate(steps):
            x_t = add_noise(latents, noise, torch.as_tensor(t))
            timestep = torch.full((batch,), float(t) * timestep_scale, device=latents.device)
            for name, arguments in branches.items():
                hints = {"step_index": index, "num_inference_steps": len(steps)}
                with torch.no_grad(), cache_context(model, name, **hints):
                    model(
                        **{adapter.hidden_states_arg: x_t, adapter.timestep_arg: timestep},
                        **arguments,
                        return_dict=False,
                    )
        return latents

    return CalibrationRun(run, len(steps), guidance, {"data": "dataset", "samples": batch, "seed": seed})
