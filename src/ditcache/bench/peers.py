"""The peers, applied to the very same transformer: diffusers' own cache hooks and cache-dit.

A peer that is not installed, or that does not support the model, becomes a skipped row with the reason;
it never crashes the benchmark. Install cache-dit with `pip install -c constraints-cpu.txt -e ".[peers]"`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import io
import os
from typing import Any

from .variants import Detach, Variant


def _diffusers_hook(label: str, steps: int, make_config: Any) -> Variant:
    def attach(pipe: Any) -> Detach:
        return enable_diffusers_cache(pipe, make_config(pipe))

    return Variant(label=label, kind="peer", steps=steps, attach=attach)


def enable_diffusers_cache(pipe: Any, config: Any) -> Detach:
    """A diffusers cache config on the pipeline's transformer: `enable_cache` where the class has it (CacheMixin);
    otherwise (DiT, Latte) diffusers' own `apply_*` function on a copy of the transformer (nothing undoes
    those hooks), whose branch contexts `ditcache.cache_context` sets. Returns the detach function."""
    transformer = pipe.transformer
    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(config)

        def disable() -> dict[str, Any]:
            transformer.disable_cache()
            return {}

        return disable
    from diffusers import hooks

    apply = {
        "FirstBlockCacheConfig": hooks.apply_first_block_cache,
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
        "MagCacheConfig": hooks.apply_mag_cache,
        "PyramidAttentionBroadcastConfig": hooks.apply_pyramid_attention_broadcast,
    }[type(config).__name__]
    pipe.transformer = pipe.model.transformer = copy.deepcopy(transformer)
    apply(pipe.transformer, config)

    def restore() -> dict[str, Any]:
        pipe.transformer = pipe.model.transformer = transformer
        return {}

    return restore


def taylorseer_identifiers(model: Any) -> list[str]:
    """Every block's attention submodules, as diffusers TaylorSeer's `cache_identifiers` (regexes,
    `re.fullmatch`): what its defaults mean to name (`^transformer_blocks.*attn`, ...), which match Flux's
    `attn` but not Wan's or Latte's `attn1` / `attn2`, so those ran uncached (1.00x, measured)."""
    from ..adapters import adapter_for

    return [
        rf"{spec.attr}\.\d+\.({'|'.join(spec.attention)})" for spec in adapter_for(model).block_lists if spec.attention
    ]


def calibrate_mag_ratios(pipe: Any, run: Any, steps: int) -> list[float]:
    """MagCache's calibration mode only prints its ratios; capture and parse them."""
    from diffusers import MagCacheConfig

    detach = enable_diffusers_cache(pipe, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            run()
    finally:
        detach()
    lists = [line for line in buffer.getvalue().splitlines() if line.strip().startswith("[")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in ast.literal_eval(lists[-1].strip())]


def diffusers_peers(steps: int, mag_ratios: list[float] | None) -> list[Variant]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    variants = [
        _diffusers_hook(f"diffusers FBCache {t}", steps, lambda pipe, t=t: FirstBlockCacheConfig(threshold=t))
        for t in (0.05, 0.1, 0.2)
    ]
    variants += [
        _diffusers_hook(
            f"diffusers TaylorSeer N={n}",
            steps,
            lambda pipe, n=n: TaylorSeerCacheConfig(
                cache_interval=n,
                disable_cache_before_step=3,
                max_order=1,
                taylor_factors_dtype=None,
                cache_identifiers=taylorseer_identifiers(pipe.transformer),
            ),
        )
        for n in (3, 5)
    ]
    if mag_ratios is not None:
        variants += [
            _diffusers_hook(
                f"diffusers MagCache {t}",
                steps,
                lambda pipe, t=t: MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=list(mag_ratios)),
            )
            for t in (0.06, 0.12)
        ]
    variants.append(
        _diffusers_hook(
            "diffusers PAB",
            steps,
            lambda pipe: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(100, 900),
                current_timestep_callback=lambda: pipe.current_timestep,
            ),
        )
    )
    return variants


def cache_dit_peers(steps: int, num_blocks: int) -> list[Variant]:
    if importlib.util.find_spec("cache_dit") is None:
        return [Variant(label="cache-dit", kind="peer", steps=steps, skip_reason="cache-dit is not installed")]
    variants = []
    # F8B0 computes the first 8 blocks; on a model with <= 8 blocks that is everything, so half the
    # depth stands in for it (the label says which).
    for fn in sorted({1, 8 if num_blocks > 8 else max(1, num_blocks // 2)}):
        for threshold in (0.08, 0.16):
            for taylor in (False, True):
                label = f"cache-dit DBCache F{fn}B0 {threshold}" + (" +TaylorSeer" if taylor else "")
                attach = _cache_dit_attach(fn, threshold, taylor, steps)
                variants.append(Variant(label=label, kind="peer", steps=steps, attach=attach))
    return variants


def _cache_dit_attach(fn: int, threshold: float, taylor: bool, steps: int) -> Any:
    def attach(pipe: Any) -> Detach:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read when cache_dit is first imported
        import cache_dit

        # cache-dit patches the transformer's forward and does not undo it on disable_cache, which breaks
        # every method measured after it; it gets its own copy of the same weights instead.
        original = pipe.transformer
        pipe.transformer = pipe.model.transformer = copy.deepcopy(original)
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=fn,
            Bn_compute_blocks=0,
            residual_diff_threshold=threshold,
            max_warmup_steps=2,
            num_inference_steps=steps,
            enable_separate_cfg=pipe.separate_cfg,
        )
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylor else None
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(pipe.transformer, cache_config=config, calibrator_config=calibrator)

        def detach() -> dict[str, Any]:
            stats = {}
            with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                summary = cache_dit.summary(pipe.transformer)
                if summary:
                    stats["cached_steps"] = len(summary[0].cached_steps) + len(summary[0].cfg_cached_steps)
            cache_dit.disable_cache(pipe.transformer)
            pipe.transformer = pipe.model.transformer = original
            return stats

        return detach

    return attach
