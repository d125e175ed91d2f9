"""`ditcache.calibrate(target, method, ...)`: offline profiles on any supported model, saved where `apply` finds them.

A method that needs offline data registers a calibrator, `(model, CalibrationRun, model_name) -> Profile`, under
its profile method name (`PolicyConfig.profile_method`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import mixcache, omnicache, omnicache_layered, thresholds, tokencache
from .profiles import Profile, save_user_profile
from .record import CalibrationRun

Calibrator = Callable[[torch.nn.Module, CalibrationRun, "str | None"], Profile]
_CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(method: str, calibrator: Calibrator) -> None:
    if method in _CALIBRATORS:
        raise ValueError(f"a calibrator for {method!r} is already registered")
    _CALIBRATORS[method] = calibrator


def calibration_methods() -> list[str]:
    return sorted(_CALIBRATORS)


def calibrate(
    target: Any,
    method: str,
    *,
    num_steps: int,
    run: Callable[..., Any] | None = None,
    prompts: Sequence[str] | None = None,
    guidance: float | None = None,
    seed: int = 0,
    name: str | None = None,
    save: bool = True,
    **pipeline_kwargs: Any,
) -> Profile:
    """Calibrate `method` on a model and save the profile where `ditcache.apply` finds it.

    Args:
        target: a diffusers pipeline (its `.transformer` is calibrated) or a supported transformer.
        method: a registered calibration method: "mixcache", "omnicache-trajectory", "omnicache-layered"
            (per (layer, step) loss and cost for OmniCache's layered schedule), "teacache", "precisecache" (the
            last two: the per-step statistic their `target_reuse` thresholds come from).
        num_steps: sampling steps of the calibration generations (profiles are per step count).
        run: a callable that performs one generation with the model (a hand-written loop); it should return
            the final latent in the model's input layout when it can (OmniCache uses it as the trajectory's
            end). Required for a bare model; for a pipeline it replaces the default call. A `run(handle)`
            taking one argument gets the recording handle, to name CFG branches with `handle.branch(...)`
            on models without diffusers' `cache_context`.
        prompts: for a pipeline without `run`: the prompts, called as `pipe(prompt=prompts,
            num_inference_steps=num_steps, generator=..., output_type="latent", **pipeline_kwargs)`.
        guidance: the CFG scale the sampler combines the "cond" and "uncond" forwards with; for a pipeline it
            defaults to `true_cfg_scale` or `guidance_scale` in `pipeline_kwargs`.
        seed: generator seed of the default pipeline call.
        name: a readable model name stored in the profile (default: the class name).
        save: write the profile to `user_profile_dir()` (default True).

    Example:
        >>> import ditcache, torch
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model, inputs = tiny_model("wan"), tiny_inputs("wan")
        >>> uncond = dict(inputs, encoder_hidden_states=torch.zeros_like(inputs["encoder_hidden_states"]))
        >>> del uncond["hidden_states"]
        >>> run = lambda: euler_sample(model, "wan", inputs, 8, uncond, guidance=3.0)
        >>> profile = ditcache.calibrate(model, "omnicache-trajectory", num_steps=8, run=run, guidance=3.0)
        >>> handle = ditcache.apply(model, "omnicache-traj-slow")   # finds the saved profile
        >>> with handle.generation(num_steps=8):
        ...     _ = run()
        >>> handle.stats().last.steps
        8
        >>> handle.remove()
    """
    if method not in _CALIBRATORS:
        raise ValueError(f"method must be one of {calibration_methods()}, got {method!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    model, generation = _calibration_run(target, num_steps, run, prompts, guidance, seed, pipeline_kwargs)
    profile = _CALIBRATORS[method](model, generation, name)
    if save:
        profile.data["saved_to"] = str(save_user_profile(profile))
    return profile


def _calibration_run(
    target: Any,
    num_steps: int,
    run: Callable[..., Any] | None,
    prompts: Sequence[str] | None,
    guidance: float | None,
    seed: int,
    pipeline_kwargs: dict[str, Any],
) -> tuple[torch.nn.Module, CalibrationRun]:
    meta: dict[str, Any] = {"seed": seed}
    if isinstance(target, torch.nn.Module):
        if run is None:
            raise ValueError("calibrating a bare model needs run=<callable performing one generation>")
        return target, CalibrationRun(run, num_steps, guidance, meta)
    model = getattr(target, "transformer", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"target must be a diffusers pipeline or a supported transformer, got {type(target).__name__}")
    if guidance is None:
        guidance = pipeline_kwargs.get("true_cfg_scale", pipeline_kwargs.get("guidance_scale"))
    if run is None:
        if not prompts or isinstance(prompts, str):
            raise ValueError("calibrating a pipeline needs prompts=[...] (a list of strings) or run=<callable>")
        kwargs = dict(pipeline_kwargs)

        def run() -> Any:
            generator = torch.Generator().manual_seed(seed)
            return target(
                prompt=list(prompts),
                num_inference_steps=num_steps,
                generator=generator,
                output_type="latent",
                **kwargs,
            )

        meta["prompts"] = len(prompts)
    return model, CalibrationRun(run, num_steps, guidance, meta)


register_calibrator("mixcache", mixcache.calibrate)
register_calibrator("omnicache-trajectory", omnicache.calibrate)
register_calibrator("omnicache-layered", omnicache_layered.calibrate)
register_calibrator("teacache", thresholds.calibrate_teacache)
register_calibrator("precisecache", thresholds.calibrate_precisecache)
register_calibrator("tokencache", tokencache.calibrate)
