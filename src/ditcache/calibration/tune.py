"""`ditcache.tune(target, speedup=..., num_steps=...)`: the best config for this model at a requested speedup.

One generation (a pipeline with prompts, or a model with a `run` callable, as for `ditcache.calibrate`) runs
uncached, then with each candidate config. Each candidate gets its measured MACs speedup and the PSNR of its
final latent against the uncached one, and, where the generation can run with fewer steps, the PSNR of simply
running round(num_steps / speedup) steps at that speedup. The winner is the best PSNR among the candidates
that reach the requested speedup; it is saved as an "auto" profile that `ditcache.apply(pipe, "auto:speedup=2")`
finds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import PolicyConfig
from .profiles import Profile, ProfileMismatchError, model_fingerprint, user_profile_dir
from .record import CalibrationRun, final_latent, takes_handle
from .tune_result import Candidate, TuneError, TuneResult, _db, latent_psnr

# Knobs tried besides the presets (specs of `ditcache.parse_policy`); presets they equal are not run twice.
GRID = (
    *(f"teacache-0.1:threshold={t}" for t in (0.02, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4)),
    *(f"precisecache-base:alpha={a}" for a in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)),
    *(f"static-2:interval={n}" for n in (2, 3, 4, 5)),
    *(f"fora-2:interval={n}" for n in (2, 3, 4, 5)),
    *(f"omnicache-traj-{speed}:filtering={on}" for speed in ("slow", "fast") for on in (True, False)),
)


def default_candidates() -> list[str]:
    """Every registered preset but `auto`, then the knob grid (`GRID`)."""
    from ..registry import presets

    return [name for name in presets() if name != "auto"] + list(GRID)


def spec_of(config: PolicyConfig) -> str:
    """A `parse_policy` spec for `config`: the preset it equals, else the closest preset of its type with
    overrides; the repr when no preset has its type."""
    from ..registry import preset, presets

    best: tuple[int, str] | None = None
    for name in presets():
        base = preset(name)
        if type(base) is not type(config):
            continue
        changes = [
            f"{f.name}={getattr(config, f.name)!r}"
            for f in dataclasses.fields(config)
            if f.init and getattr(config, f.name) != getattr(base, f.name)
        ]
        text = ":".join([name, *changes])
        if best is None or len(changes) < best[0]:
            best = (len(changes), text)
    return best[1] if best is not None else repr(config)


def _candidate_configs(candidates: Iterable[str | PolicyConfig] | None) -> list[tuple[str, PolicyConfig]]:
    from ..policies.auto import AutoConfig
    from ..registry import parse_policy

    if isinstance(candidates, str):
        raise ValueError("candidates must be a list of specs or configs, not one string")
    items = default_candidates() if candidates is None else list(candidates)
    seen: list[PolicyConfig] = []
    chosen = []
    for item in items:
        config = parse_policy(item) if isinstance(item, str) else item
        if not isinstance(config, PolicyConfig):
            raise TypeError(f"a candidate must be a preset spec or a PolicyConfig, got {type(item).__name__}")
        if isinstance(config, AutoConfig):
            raise ValueError("'auto' cannot be a candidate of ditcache.tune (it is what tune makes)")
        if config in seen:
            continue
        seen.append(config)
        chosen.append((item if isinstance(item, str) else spec_of(config), config))
    if not chosen:
        raise ValueError("no candidates to tune")
    return chosen


def _takes_num_steps(run: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("num_steps")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _run_with(
    model: torch.nn.Module, config: Any, run: Callable[..., Any], num_steps: int, kwargs: dict[str, Any] | None = None
) -> tuple:
    """Apply `config`, run one generation of `num_steps` (`run(**kwargs)`), remove: (final latent, its stats)."""
    kwargs = kwargs or {}
    from ..api import apply

    handle = apply(model, config)
    try:
        with torch.no_grad(), handle.generation(num_steps=num_steps):
            result = run(handle, **kwargs) if takes_handle(run) else run(**kwargs)
        stats = handle.stats()
    finally:
        handle.remove()
    latent = final_latent(result)
    if latent is None:
        raise ValueError(
            f"the generation returned {type(result).__name__}, not its final latent: tune compares final latents, "
            "so run() must return a tensor (or a pipeline output with .images / .frames; call the pipeline with "
            "output_type='latent')"
        )
    if not stats.generations or stats.last.steps != num_steps:
        ran = [g.steps for g in stats.generations]
        raise ValueError(
            f"the generation ran {ran} steps (per detected generation) but num_steps is {num_steps}: give the step "
            "count the generation really uses, and name CFG forwards with cache_context or run(handle) + "
            "handle.branch('cond'/'uncond'), or each one starts a new generation"
        )
    return latent.detach().clone(), stats.last


def tune(
    target: Any,
    *,
    speedup: float,
    num_steps: int,
    run: Callable[..., Any] | None = None,
    prompts: Sequence[str] | None = None,
    guidance: float | None = None,
    seed: int = 0,
    candidates: Iterable[str | PolicyConfig] | None = None,
    save: bool = True,
    name: str | None = None,
    out: str | Path | None = None,
    **pipeline_kwargs: Any,
) -> TuneResult:
    """Measure candidate configs on one generation of the model and pick the best one at `speedup`.

    The generation runs uncached once (the reference final latent), then once per candidate, each applied with
    `ditcache.apply` on a fresh handle removed afterwards. A candidate is scored by its MACs speedup
    (`handle.stats().last.macs_speedup`) and the PSNR of its final latent against the uncached one (peak: the
    reference's value range). Where the generation can run with another step count (a pipeline, or a `run`
    with a `num_steps` keyword), the "fewer steps" baseline at the candidate's speedup is measured too:
    round(num_steps / speedup) steps, PSNR against the uncached latent. Candidates that need a calibration
    profile this model lacks (MixCache, OmniCache trajectory, thresholds with `target_reuse`) are calibrated
    first with `ditcache.calibrate` on the same generation; those profiles are saved in the user profile
    directory whatever `save` says, since the winner needs them when applied.

    Args:
        target: a diffusers pipeline or a supported transformer, as for `ditcache.calibrate`.
        speedup: the MACs speedup to reach (> 1).
        num_steps: sampling steps of the generation (the profile is per step count).
        run: one generation, as for `ditcache.calibrate`: `run()` or `run(handle)`, returning the final
            latent. With a `num_steps=` keyword (`run(handle, num_steps=8)`) the fewer-steps baseline runs too.
            Required for a bare model.
        prompts: for a pipeline without `run`: called as `pipe(prompt=prompts, num_inference_steps=...,
            generator=torch.Generator().manual_seed(seed), output_type="latent", **pipeline_kwargs)`.
        guidance: CFG scale of the sampler (passed to calibrations); defaults as in `ditcache.calibrate`.
        seed: generator seed of the default pipeline call.
        candidates: preset specs (`"fora-3"`, `"teacache-0.1:threshold=0.4"`) or configs; default: every preset
            but `auto` plus a grid of knobs (`GRID`: TeaCache thresholds 0.02-0.4, PreciseCache alpha 0.5-8,
            static / FORA intervals 2-5, OmniCache trajectory filtering on / off).
        save: save the winner as an "auto" profile in `user_profile_dir()` (one file per model, step count and
            speedup), found by `ditcache.apply(pipe, "auto:speedup=...")`.
        name: a readable model name stored in the profiles (default: the class name).
        out: save the "auto" profile at this path instead (e.g. into a folder shipped with a package).

    Returns:
        `TuneResult`: `candidates` (spec, MACs speedup, PSNR, fewer-steps PSNR, margin), `winner`, `config`,
        `spec`, `profile`, `saved_to`, and `table()` (markdown).

    Raises:
        TuneError (a `ValueError`): no candidate reaches `speedup`; names the fastest one, and `.result`
            holds the measurements.

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model, inputs = tiny_model("wan", seed=4), tiny_inputs("wan")
        >>> run = lambda handle, num_steps=8: euler_sample(model, "wan", inputs, num_steps, handle=handle)
        >>> result = ditcache.tune(model, speedup=1.5, num_steps=8, run=run, candidates=["fora-2", "static-3"])
        >>> [c.spec for c in result.candidates], result.winner.macs_speedup >= 1.5
        (['fora-2', 'static-3'], True)
        >>> ditcache.tune(model, speedup=5, num_steps=8, run=run, candidates=["fora-2"], save=False)
        Traceback (most recent call last):
        ...
        ditcache.calibration.tune_result.TuneError: no candidate reaches a MACs speedup of 5x ...
    """
    from ..policies.auto import METHOD, auto_profile_name
    from ..policies.nocache import NoCacheConfig
    from .api import _calibration_run, calibrate, calibration_methods

    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 1:
        raise ValueError(f"speedup must be a number > 1, got {speedup!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    configs = _candidate_configs(candidates)
    model, generation = _calibration_run(target, num_steps, run, prompts, guidance, seed, pipeline_kwargs)
    can_fewer = run is None or _takes_num_steps(run)
    if run is None:  # a pipeline called with prompts: the same call at any step count
        call = dict(pipeline_kwargs)

        def pipeline_run(num_steps: int = num_steps) -> Any:
            generator = torch.Generator().manual_seed(seed)
            return target(
                prompt=list(prompts), num_inference_steps=num_steps, generator=generator, output_type="latent", **call
            )

        generation = CalibrationRun(pipeline_run, num_steps, generation.guidance, generation.meta)
    reference, _ = _run_with(model, NoCacheConfig(), generation.run, num_steps)

    fewer: dict[int, float | None] = {num_steps: math.inf}
    notes: list[str] = []

    def fewer_steps_psnr(steps: int) -> float | None:
        nonlocal can_fewer
        if steps not in fewer:
            try:
                latent, _ = _run_with(model, NoCacheConfig(), generation.run, steps, {"num_steps": steps})
                fewer[steps] = latent_psnr(latent, reference)
            except (ValueError, TypeError, RuntimeError) as error:
                can_fewer = False  # this generation cannot run another step count: no baseline
                fewer[steps] = None
                notes.append(f"no fewer-steps baseline: the generation failed at {steps} steps ({_short(error)})")
        return fewer[steps]

    calibrated: dict[str, str | None] = {}  # profile method -> None (calibrated) or why it failed

    def measure(config: PolicyConfig) -> tuple[torch.Tensor, Any]:
        try:
            return _run_with(model, config, generation.run, num_steps)
        except ProfileMismatchError:
            method = type(config).profile_method
            if method is None or method not in calibration_methods() or method in calibrated:
                raise
            calibrated[method] = None
            try:  # no profile for this model and step count yet: calibrate on the same generation, then retry
                calibrate(
                    target,
                    method,
                    num_steps=num_steps,
                    run=generation.run,
                    guidance=generation.guidance,
                    seed=seed,
                    name=name,
                    save=True,
                )
            except (ValueError, TypeError, RuntimeError) as error:
                calibrated[method] = f"calibrating {method} failed: {_short(error)}"
                raise ValueError(calibrated[method]) from error
            return _run_with(model, config, generation.run, num_steps)

    measured = []
    for spec, config in configs:
        candidate = Candidate(spec, config)
        try:
            latent, stats = measure(config)
        except (ValueError, TypeError, RuntimeError, KeyError) as error:
            candidate.error = _short(error)
        else:
            candidate.macs_speedup = stats.macs_speedup
            candidate.psnr = latent_psnr(latent, reference)
            if can_fewer:
                steps = max(1, min(num_steps, round(num_steps / candidate.macs_speedup)))
                candidate.fewer_steps_psnr = fewer_steps_psnr(steps)
                candidate.fewer_steps = steps if candidate.fewer_steps_psnr is not None else None
        measured.append(candidate)

    result = TuneResult(float(speedup), num_steps, measured, None, notes=notes)
    reaching = result.reaching()
    if not reaching:
        ok = [c for c in measured if c.error is None]
        if not ok:
            errors = "; ".join(f"{c.spec}: {c.error}" for c in measured)
            raise TuneError(f"no candidate could be measured on this {type(model).__name__}: {errors}", result)
        fastest = max(ok, key=lambda c: c.macs_speedup)
        raise TuneError(
            f"no candidate reaches a MACs speedup of {speedup:g}x on this {type(model).__name__} at {num_steps} "
            f"steps; the fastest is {fastest.spec} at {fastest.macs_speedup:.2f}x (PSNR {_db(fastest.psnr)}): ask "
            f"for at most {math.floor(fastest.macs_speedup * 100) / 100:g}x, or pass faster candidates= (e.g. "
            "larger intervals or thresholds)",
            result,
        )
    result.winner = winner = reaching[0]
    result.profile = Profile(
        method=METHOD,
        model_name=name or type(model).__name__,
        fingerprint=model_fingerprint(model),
        num_steps=num_steps,
        data={
            "speedup": float(speedup),
            "config": stored_config(winner.config),
            "spec": winner.spec,
            "macs_speedup": winner.macs_speedup,
            "psnr": winner.to_dict()["psnr"],
            "guidance": generation.guidance,
            **{k: v for k, v in generation.meta.items() if isinstance(v, (int, float, str, bool))},
            "candidates": [c.to_dict() for c in measured],
        },
    )
    if out is not None or save:
        profile = result.profile
        path = (
            Path(out)
            if out is not None
            else user_profile_dir()
            / auto_profile_name(profile.model_name, profile.fingerprint, num_steps, float(speedup))
        )
        result.saved_to = profile.save(path)
    return result


def stored_config(config: PolicyConfig) -> dict[str, Any]:
    """`config.to_dict()` without the fields left at their defaults: `config_from_dict` rebuilds it, and a saved
    profile keeps working when a config class gains (or drops) a field it does not set."""
    full = config.to_dict()
    kept = {"policy": full["policy"]}
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else dataclasses.MISSING
        if default is dataclasses.MISSING or getattr(config, field.name) != default:
            kept[field.name] = full[field.name]
    return kept


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."
