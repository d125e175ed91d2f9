"""Command-line helpers for the user's own pipelines (`--pipeline SPEC --prompts FILE --call k=v`) and `tune`.

`cli.py` holds the parser and the reference-model paths; the commands dispatch here when `--pipeline` is given.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _reference_model(args: argparse.Namespace) -> str:
    """The reference-model path: refuse the --pipeline-only options, default the model."""
    for option in ("prompts", "call"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option} needs --pipeline SPEC (reference models are sampled by class label)")
    args.model = args.model or "ref-image"
    return args.model


def _user_pipeline(args: argparse.Namespace) -> tuple:
    """(pipeline, prompts, call arguments) of a --pipeline command; cheap checks before loading the model."""
    from .userpipe import load_pipeline, pipeline_kwargs, read_prompts

    if args.prompts is None:
        raise ValueError("--pipeline needs --prompts FILE (one prompt per line, # comments)")
    call = pipeline_kwargs(args.call)
    prompts = read_prompts(args.prompts)
    return load_pipeline(args.pipeline), prompts, call


def _generate_pipeline(args: argparse.Namespace) -> int:
    """Uncached, cached with --policy, and uncached with fewer steps at the cached run's MACs speedup."""
    from pathlib import Path

    from . import apply
    from .metrics.quality import psnr
    from .userpipe import generate
    from .visual import image_grid, save_samples

    pipe, prompts, call = _user_pipeline(args)
    print(f"{args.pipeline}: {type(pipe).__name__}, {len(prompts)} prompts, {args.steps} steps, policy {args.policy}")

    def timed(label: str, steps: int) -> tuple[torch.Tensor, float]:
        print(f"{label}: {steps} steps")
        start = time.perf_counter()
        out = generate(pipe, prompts, steps, args.seed, call)
        return out, time.perf_counter() - start

    timed("warm-up (untimed)", min(2, args.steps))
    reference, base_seconds = timed("uncached", args.steps)
    rows, seconds, quality, stats = [reference], {"uncached": base_seconds}, {}, None
    if args.policy != "none":
        handle = apply(pipe, args.policy)
        try:
            cached, seconds["cached"] = timed(f"cached ({args.policy})", args.steps)
            stats = handle.stats()
        finally:
            handle.remove()
        macs_speedup = stats.last.macs_speedup
        fewer = max(1, min(args.steps, round(args.steps / macs_speedup)))
        label = f"uncached, fewer steps at the same MACs speedup ({macs_speedup:.2f}x)"
        fewer_out, seconds["fewer"] = timed(label, fewer)
        rows += [cached, fewer_out]
        quality = {"cached": psnr(cached, reference), f"fewer steps ({fewer})": psnr(fewer_out, reference)}
        print(f"uncached: {base_seconds:.2f} s")
        print(
            f"cached ({args.policy}): {seconds['cached']:.2f} s, wall-clock speedup "
            f"{base_seconds / seconds['cached']:.2f}x, MACs speedup {macs_speedup:.2f}x"
        )
        print(
            f"fewer steps ({fewer}): {seconds['fewer']:.2f} s, wall-clock speedup "
            f"{base_seconds / seconds['fewer']:.2f}x, MACs speedup {args.steps / fewer:.2f}x"
        )
        print(stats.summary())
        print("PSNR vs uncached: " + ", ".join(f"{k} {v:.2f} dB" for k, v in quality.items()))
    else:
        print(f"uncached: {base_seconds:.2f} s")
    samples = torch.cat(rows)
    if samples.ndim == 4:  # one row per run (uncached / cached / fewer steps), one column per image
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(samples, columns=reference.shape[0]).save(out)
        written = [out]
    else:
        written = save_samples(samples, args.out)  # videos: one strip row per video
    print(f"wrote {', '.join(str(p) for p in written)} (rows: " + ", ".join(["uncached", *quality][: len(rows)]) + ")")
    if args.json:
        payload = {
            "seconds": seconds,
            "psnr": quality,
            "stats": stats.to_dict() if stats else None,
            "files": [str(p) for p in written],
        }
        print(json.dumps(payload, indent=2, default=float))
    return 0


def _bench_pipeline(args: argparse.Namespace, policies: tuple[str, ...], fewer: tuple[int, ...] | None) -> int:
    from .bench.user import markdown_table, run_user_bench, write_user_files

    pipe, prompts, call = _user_pipeline(args)
    result = run_user_bench(
        pipe,
        prompts,
        steps=args.steps,
        policies=policies,
        call=call,
        repeats=args.repeats,
        seed=args.seed,
        fewer_steps=fewer,
        peers=args.peers,
        name=args.pipeline,
    )
    print(f"machine: {result.machine}")
    print(
        f"{args.pipeline}: {len(prompts)} prompts, {args.steps} steps; MACs of one whole pipeline call, "
        "PSNR/SSIM vs the uncached images"
    )
    print(markdown_table(result))
    meta = {"pipeline": args.pipeline, "prompts": prompts, "call": call}
    for path in write_user_files(result, args.out, meta):
        print(f"wrote {path}")
    return 0


def _print_profile_summary(method: str, data: dict, steps: int) -> None:
    """What a calibration measured: OmniCache's schedules and gammas, MixCache's thresholds and impacts."""
    if method == "omnicache-trajectory":
        for speed, reused in data["schedules"].items():
            print(f"{speed}: reuse {len(reused)}/{steps} steps: {reused}")
        print("gamma: " + ", ".join(f"{g:.2f}" for g in data["gamma"]))
    elif method == "omnicache-layered":
        for speedup, schedule in data["schedules"].items():
            cells = schedule["cells"]
            print(f"{speedup}x: reuse {len(cells)} (block, step) cells, MACs speedup {schedule['macs_speedup']:.2f}")
    elif method == "tokencache":
        loss = data["loss"]["predictor"] or {"first": float("nan"), "last": float("nan")}
        print(
            f"predictor: {data['iterations'][0]} iterations, loss {loss['first']:.4f} -> {loss['last']:.4f}; LoRA on "
            f"blocks {data['lora_positions']} ({data['iterations'][1]} iterations); {data['seconds']} s"
        )
        print(f"I-steps (eq13, {data['full_steps']}, beta {data['beta']:.2f}): {data['i_steps']}")
        print("block update fractions at r = 0.9: " + ", ".join(f"{f:.3f}" for f in data["block_fractions"]))
    elif method in ("teacache", "precisecache"):
        values = ", ".join("-" if v is None else f"{v:.4f}" for v in data["values"])
        print(f"per-step {'rel-L1 of the modulated input' if method == 'teacache' else 'LFD'}: {values}")
    else:
        print(
            f"theta {data['theta']:.4f}, delta1 {data['delta1']:.4f}, delta2 {data['delta2']:.4f}, "
            f"warm-up {data['warmup_steps']} steps"
        )
        print(
            f"impact: step {data['impact_step']:.4f}, cfg {data['impact_cfg']:.4f}, blocks (mean) "
            + ", ".join(f"{k}: {sum(v) / len(v):.4f}" for k, v in data["impact_block"].items())
        )


CALIBRATED_PRESETS = {
    "mixcache": "mixcache-acc / mixcache-eff",
    "omnicache-trajectory": "omnicache-traj-slow / -fast",
    "omnicache-layered": "omnicache-layered-2x / -3x, omnicache-hier-layered-2x",
    "teacache": "teacache-2x / teacache-3x",
    "precisecache": "precisecache-2x / precisecache-3x",
    "tokencache": "tokencache / tokencache-fast / tokencache-safe",
}


def _calibrate_pipeline(args: argparse.Namespace) -> int:
    from . import calibrate
    from .calibration.profiles import user_profile_dir

    if args.out is not None:
        raise ValueError(
            f"--out is for reference models; a --pipeline profile is saved in the user profile directory "
            f"({user_profile_dir()}; set $DITCACHE_PROFILE_DIR to change it), where ditcache.apply finds it"
        )
    pipe, prompts, call = _user_pipeline(args)
    print(
        f"calibrating {args.method} on {type(pipe).__name__} ({type(pipe.transformer).__name__}), {args.steps} steps, "
        f"{len(prompts)} prompts: recording generations follow, each with the pipeline's progress bar"
    )
    profile = calibrate(
        pipe, args.method, num_steps=args.steps, prompts=prompts, guidance=args.guidance, seed=args.seed, **call
    )
    data = profile.data
    print(f"measured on {data.get('samples', len(prompts))} samples, guidance {data.get('guidance')}:")
    _print_profile_summary(args.method, data, args.steps)
    print(f"saved {data['saved_to']}")
    print(
        f"use it: ditcache.apply(pipe, preset) with preset {CALIBRATED_PRESETS.get(args.method, args.method)}, "
        f"then pipe(..., num_inference_steps={args.steps})"
    )
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    """Measure candidate configs on one generation, print the table, save the winner as `auto:speedup=N`."""
    from .calibration.tune import TuneError, tune

    candidates = split_policies(args.candidates) if args.candidates else None
    options = dict(speedup=args.speedup, num_steps=args.steps, candidates=candidates)
    if args.pipeline is not None:
        if args.out is not None:
            raise ValueError("--out is for reference models; a --pipeline tune is saved in the user profile directory")
        pipe, prompts, call = _user_pipeline(args)
        print(
            f"tuning {type(pipe).__name__} ({type(pipe.transformer).__name__}) for a {args.speedup:g}x MACs speedup "
            f"at {args.steps} steps on {len(prompts)} prompts: one generation per candidate follows"
        )
        target, options = pipe, dict(options, prompts=prompts, guidance=args.guidance, seed=args.seed or 0, **call)
        use = f"ditcache.apply(pipe, 'auto:speedup={args.speedup:g}'), then pipe(..., num_inference_steps={args.steps})"
    else:
        from .refmodels import RefPipeline

        _reference_model(args)
        if args.guidance is not None:
            raise ValueError("--guidance needs --pipeline SPEC (reference models sample at their own scale)")
        pipe = RefPipeline.from_pretrained(args.model)
        seed = 1 if args.seed is None else args.seed  # the seed of the shipped calibrations

        def run(num_steps: int = args.steps) -> torch.Tensor:
            return pipe.calibration_run(num_steps, args.samples, seed=seed).run()

        print(f"tuning {args.model} for a {args.speedup:g}x MACs speedup at {args.steps} steps, {args.samples} samples")
        guidance = pipe.calibration_run(args.steps, args.samples, seed=seed).guidance
        target = pipe.transformer
        options = dict(options, run=run, guidance=guidance, seed=seed, name=args.model, out=args.out)
        use = f"ditcache generate --model {args.model} --steps {args.steps} --policy auto:speedup={args.speedup:g}"
    try:
        result = tune(target, **options)
    except TuneError as error:
        print(error.result.table())
        raise
    print(result.table())
    print(f"winner: {result.spec} ({result.winner.macs_speedup:.2f}x MACs, PSNR {result.winner.psnr:.2f} dB)")
    print(f"saved {result.saved_to}")
    print(f"use it: {use}")
    return 0


def split_policies(text: str) -> tuple[str, ...]:
    """Split "a,b:x=(1,2),c" on the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return tuple(p.strip() for p in parts if p.strip())
