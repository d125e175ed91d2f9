"""Calibration through the engine's hooks, on any supported model and any way of sampling it.

A calibration generation is whatever `run()` does: a diffusers pipeline call, a hand-written loop, the reference
pipeline. While it runs, a recording policy (computes everything, reuses nothing) keeps what a method needs:
the model's input latent per step (the sampling trajectory), its output per step and branch (redundancy, CFG
difference), and method-specific extras (block outputs, cache noise). Perturbation runs re-invoke the same
generation with the recorded inputs replayed, so no pipeline-specific interface is ever called.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..engine.calls import ForwardCall, sample_of
from ..policies.base import Policy

Key = tuple[str, int]  # (branch, step)


@dataclasses.dataclass
class CalibrationRun:
    """One calibration generation: `run()` (or `run(handle)`, see `takes_handle`) samples once, returning the
    final latent where it can, in the model's input layout (e.g. a pipeline called with `output_type="latent"`);
    `num_steps` sampling steps."""

    run: Callable[[], Any]
    num_steps: int
    guidance: float | None = None  # CFG scale the sampler combines the branches with (None: no CFG)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # saved with the profile


class RecordingPolicy(Policy):
    """Computes every forward and keeps inputs and outputs per (branch, step); subclasses add extras."""

    def __init__(self, config: Any, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.inputs: dict[Key, torch.Tensor] = {}
        self.outputs: dict[Key, torch.Tensor] = {}

    def forward(self, call: ForwardCall) -> Any:
        output = self.compute(call)
        key = (call.info.branch, call.info.step)
        self.inputs[key] = call.hidden_states.detach().clone()
        self.outputs[key] = sample_of(output).detach().clone()
        return output

    def compute(self, call: ForwardCall) -> Any:
        return call.run()


def takes_handle(run: Callable[..., Any]) -> bool:
    """`run(handle)` lets a loop name its CFG branches with `handle.branch(...)` (models without diffusers'
    `cache_context`, like SD3's); a `run()` without parameters is called as is."""
    try:
        parameters = inspect.signature(run).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters)


def final_latent(result: Any) -> torch.Tensor | None:
    """The tensor a generation returned: a tensor, a pipeline output's `images` / `frames`, or a tuple's first."""
    if isinstance(result, torch.Tensor):
        return result
    for name in ("images", "frames", "latents", "sample"):
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    return None


def record(
    model: torch.nn.Module,
    config: Any,
    generation: CalibrationRun,
    prepare: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any]:
    """Apply a config that computes every step (a `RecordingPolicy`, or a method whose trace is wanted), run the
    generation once, remove it: (the policy with its records, the generation's result).
    `prepare(policy)` runs before the generation (e.g. to hand it recorded inputs to replay)."""
    from ..api import apply

    handle = apply(model, config)
    try:
        if prepare is not None:
            prepare(handle.policy)
        with torch.no_grad(), handle.generation(num_steps=generation.num_steps):
            result = generation.run(handle) if takes_handle(generation.run) else generation.run()
        policy = handle.policy
        records = handle.records()
        steps = {r.step for r in records if r.generation == records[-1].generation} if records else set()
    finally:
        handle.remove()
    if steps != set(range(generation.num_steps)):
        raise ValueError(
            f"the calibration generation ran steps {sorted(steps)[:5]}...{sorted(steps)[-3:]} but num_steps is "
            f"{generation.num_steps}: give the step count the generation really uses (and name CFG forwards with "
            "cache_context or run(handle) + handle.branch('cond'/'uncond'), or each one starts a new generation)"
        )
    return policy, result


def branches(keys: Any) -> tuple[str, str | None]:
    """(conditional branch, unconditional branch or None): "cond"/"uncond" when the sampler names them,
    else the one unnamed branch ("default")."""
    names = {branch for branch, _ in keys}
    if "cond" in names:
        return "cond", ("uncond" if "uncond" in names else None)
    if names == {"default"}:
        return "default", None
    raise ValueError(f"cannot tell the conditional branch among {sorted(names)}: name it 'cond' (or leave it unnamed)")


def trajectory(policy: RecordingPolicy, result: Any, num_steps: int) -> list[torch.Tensor]:
    """x_0 .. x_N: the model inputs of every step, plus the final latent when the generation returned one in
    the same layout; without it x_0 .. x_N-1 (the last step then counts as an end point: never reused)."""
    cond, _ = branches(policy.inputs)
    states = [policy.inputs[(cond, step)] for step in range(num_steps)]
    final = final_latent(result)
    if final is not None and final.shape == states[-1].shape:
        return [*states, final.detach().to(states[-1].dtype)]
    if final is not None and 2 * final.shape[0] == states[-1].shape[0] and final.shape[1:] == states[-1].shape[1:]:
        return [*states, torch.cat([final, final]).detach().to(states[-1].dtype)]  # batched CFG: [uncond; cond]
    return states
