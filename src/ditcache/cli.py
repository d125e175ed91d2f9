"""Command line: `ditcache generate | train-ref | presets | models`.

Run `ditcache <command> --help` for the options of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from .cli_compare import add_compare_parser
from .cli_pipeline import (
    _bench_pipeline,
    _calibrate_pipeline,
    _cmd_tune,
    _generate_pipeline,
    _print_profile_summary,
    _reference_model,
)
from .registry import presets

REF_MODELS = ("ref-image", "ref-video", "ref-dit", "ref-latte")  # refmodels.SPECS, without importing it
CALIBRATION_METHODS = (
    "omnicache-trajectory",
    "omnicache-layered",
    "mixcache",
    "teacache",
    "precisecache",
    "tokencache",
)


def _calibration_method(name: str) -> str:
    if name == "omnicache":
        raise argparse.ArgumentTypeError(
            "'omnicache' was renamed 'omnicache-trajectory' (the name `omnicache` is kept for the hierarchical "
            f"OmniCache); choose from {', '.join(CALIBRATION_METHODS)}"
        )
    return name


def _model_or_pipeline(parser: argparse.ArgumentParser, what: str) -> None:
    """`--model ref-...` or `--pipeline SPEC` (with `--prompts FILE` and repeated `--call key=value`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, choices=REF_MODELS, help="reference model (default ref-image)")
    source.add_argument(
        "--pipeline",
        metavar="SPEC",
        default=None,
        help=f"{what} your own diffusers pipeline: a folder saved with save_pretrained (loaded on the CPU, "
        "never downloaded), or a factory `module.path:factory` / `path/to/file.py:factory` returning it",
    )
    parser.add_argument("--prompts", metavar="FILE", default=None, help="with --pipeline: one prompt per line")
    parser.add_argument(
        "--call",
        metavar="KEY=VALUE",
        action="append",
        default=None,
        help="with --pipeline: an extra pipeline call argument, repeatable (values as Python literals, else "
        "strings), e.g. --call negative_prompt=blurry --call true_cfg_scale=3.0 --call height=512",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.parallel != "none":
        from .cli_parallel import generate_parallel

        return generate_parallel(args)
    if args.pipeline is not None:
        return _generate_pipeline(args)
    _reference_model(args)
    from . import apply
    from .cli_report import report_generation
    from .refmodels import RefPipeline, get_spec
    from .refmodels.evaluate import balanced_labels

    spec = get_spec(args.model)
    pipe = RefPipeline.from_pretrained(args.model)
    labels = balanced_labels(args.samples, spec.num_classes)
    run = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, cfg_mode=args.cfg)

    reference = None
    if args.policy != "none":
        start = time.perf_counter()
        reference = pipe(labels, **run)
        base_seconds = time.perf_counter() - start
        print(f"uncached: {base_seconds:.2f} s")
    handle = apply(pipe, args.policy)
    try:
        start = time.perf_counter()
        samples = pipe(labels, **run)
        seconds = time.perf_counter() - start
        stats = handle.stats()
    finally:
        handle.remove()
    base = base_seconds if reference is not None else None
    return report_generation(args, samples, labels, reference, seconds, base, stats)


def _cmd_train_ref(args: argparse.Namespace) -> int:
    from .metrics.classifier import train_classifier
    from .refmodels import get_spec
    from .refmodels.train import train

    out_dir = args.out_dir
    if not args.classifier_only:
        meta = train(
            args.model,
            max_steps=args.steps,
            minutes=args.minutes,
            seed=args.seed,
            out_dir=out_dir,
            init_weights=args.resume,
        )
        print(json.dumps(meta, indent=2))
    # ref-dit / ref-latte share the data (and the classifier) of ref-image / ref-video.
    data_of = get_spec(args.model).classifier_name
    accuracy = train_classifier(data_of, steps=args.classifier_steps, seed=args.seed, out_dir=out_dir)
    print(f"classifier ({data_of}'s data) held-out accuracy on real samples: {accuracy:.3f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.parallel != "none":
        from .cli_parallel import bench_parallel

        return bench_parallel(args)
    from .bench import run_bench, write_files
    from .bench.report import report_markdown
    from .cli_report import bench_config, bench_selection

    if args.pipeline is not None:
        return _bench_pipeline(args, *bench_selection(args))
    _reference_model(args)
    config = bench_config(args)
    result = run_bench(config)
    print(f"machine: {result.machine}")
    print(report_markdown(result))
    for path in write_files(result, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from .analysis.precisecache import plot_study, step_impact_study
    from .refmodels import RefPipeline

    pipe = RefPipeline.from_pretrained(args.model)
    study = step_impact_study(pipe, args.model, steps=args.steps, samples=args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step-impact.json").write_text(json.dumps(dataclasses.asdict(study), indent=2) + "\n")
    plot_study(study, str(out / "step-impact.png"))
    print(study.markdown())
    print(f"wrote {out / 'step-impact.json'}, {out / 'step-impact.png'}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import calibrate
    from .calibration.profiles import PROFILE_DIR
    from .refmodels import RefPipeline

    if args.speedup is not None and args.method != "omnicache-layered":
        raise ValueError("--speedup is for omnicache-layered (the speedups of the schedules listed in its profile)")
    if args.pipeline is not None:
        if args.speedup is not None:
            raise ValueError(
                "--speedup is for reference models; a --pipeline profile lists the 2x and 3x schedules, and "
                "OmniCacheHierarchicalConfig(layered_speedup=...) computes any other from the profile"
            )
        if args.data != "samples":
            raise ValueError(
                "--data dataset is for reference models; for your own data build the generation in Python with "
                "ditcache.calibration.dataset.noised_data_run (see docs/METHODS.md, TokenCache)"
            )
        return _calibrate_pipeline(args)
    _reference_model(args)
    if args.guidance is not None:
        raise ValueError("--guidance needs --pipeline SPEC (reference models calibrate at their own scale)")
    pipe = RefPipeline.from_pretrained(args.model)
    make_run = pipe.dataset_calibration_run if args.data == "dataset" else pipe.calibration_run
    generation = make_run(args.steps, args.samples, seed=args.seed)
    profile = calibrate(
        pipe.transformer,
        args.method,
        num_steps=args.steps,
        run=generation.run,
        guidance=generation.guidance,
        seed=args.seed,
        name=args.model,
        save=False,
    )
    profile.data.update(generation.meta)
    if args.method == "omnicache-layered" and args.speedup:
        from .calibration.omnicache_layered import schedules

        profile.data["schedules"] = schedules(profile.data, args.speedup, len(profile.data["loss"]))
    out = Path(args.out) if args.out else PROFILE_DIR / f"{args.method}-{args.model}-{args.steps}.json"
    profile.save(out)
    _print_profile_summary(args.method, profile.data, args.steps)
    print(f"wrote {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .refmodels import get_spec
    from .refmodels.evaluate import reference_report

    steps = tuple(int(n) for n in args.steps.split(","))
    video = get_spec(args.model).is_video
    report = reference_report(args.model, samples=args.samples, steps=steps)
    print(f"{args.model}: {args.samples} samples, scored against the {steps[0]}-step samples of the same seeds")
    print("| steps | class acc | FD | FD spectrum | PSNR vs first | SSIM vs first |" + (" temporal |" if video else ""))
    print("|---|---|---|---|---|---|" + ("---|" if video else ""))
    for key, row in report.items():
        cells = [
            f"{row['accuracy']:.3f}",
            f"{row['fd']:.2f}",
            f"{row['fd_spectrum']:.2f}",
            f"{row['psnr']:.2f}" if "psnr" in row else "–",  # the first row is the reference, real data has none
            f"{row['ssim']:.3f}" if "ssim" in row else "–",
        ]
        if "temporal" in row:
            cells.append(f"{row['temporal']:.3f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name, help_text in presets().items():
        print(f"{name:24s} {help_text}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .adapters import registered_adapters
    from .applicability import applicable_presets
    from .refmodels import SPECS

    print("diffusers classes with an adapter, and the presets that apply (`ditcache presets` describes them):")
    for adapter in registered_adapters():
        lists = ", ".join(f"{spec.attr} ({spec.kind})" for spec in adapter.block_lists)
        print(f"{adapter.model_class.__name__} [{adapter.name}]: blocks {lists}")
        if adapter.pipeline_cfg:
            print(f"    pipeline CFG: {adapter.pipeline_cfg}")
        unmet = {name: reasons for name, reasons in applicable_presets(adapter).items() if reasons}
        print("    presets: all" + (f" but {len(unmet)}" if unmet else ""))
        by_reason: dict[str, list[str]] = {}
        for name, reasons in unmet.items():
            by_reason.setdefault("; ".join(reasons), []).append(name)
        for reason, names in by_reason.items():
            print(f"    not {', '.join(names)}: {reason}")
    print("reference models:")
    for name, spec in SPECS.items():
        shape = "x".join(map(str, spec.sample_shape))
        detail = f"samples {shape}, {spec.num_classes} classes, {spec.prediction} prediction"
        print(f"{name:10s} {spec.family} transformer, {detail}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditcache", description="Feature caching for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="sample a reference model or your pipeline with a caching policy and score the result"
    )
    _model_or_pipeline(gen, "generate with")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    gen.add_argument("--policy", default="none", help="preset name; `ditcache presets` lists them (default none)")
    gen.add_argument("--samples", type=int, default=16, help="number of samples, classes cycled (default 16)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale (default: the model's own, 4; ref-dit 1.5)",
    )
    gen.add_argument("--cfg", default="separate", choices=("separate", "batched"), help="CFG as 2 forwards or 1")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="samples.png", help="output file (.png grid; .gif for videos)")
    gen.add_argument("--json", action="store_true", help="also print metrics and stats as JSON")
    gen.add_argument(
        "--parallel",
        default="none",
        choices=("none", "data", "ulysses", "ring"),
        help="under torchrun: data = shard the samples over the processes, ulysses = split each sample's tokens "
        "(context parallelism; ring: the same with ring attention, GPU backends only) (docs/PARALLEL.md; default "
        "none)",
    )
    gen.set_defaults(func=_cmd_generate)

    tr = sub.add_parser("train-ref", help="train a reference model and its classifier (CPU, <= 30 min)")
    tr.add_argument("model", choices=REF_MODELS)
    tr.add_argument("--minutes", type=float, default=28.0, help="CPU-time budget of the training process (default 28)")
    tr.add_argument("--resume", default=None, help="continue from these weights (a .safetensors; its .json is kept)")
    tr.add_argument("--steps", type=int, default=100_000, help="step budget (default: time-limited)")
    tr.add_argument("--classifier-steps", type=int, default=800)
    tr.add_argument("--classifier-only", action="store_true", help="retrain only the metric classifier")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out-dir", default=None, help="where to write weights (default: the package's weights/)")
    tr.set_defaults(func=_cmd_train_ref)

    bench = sub.add_parser("bench", help="policies vs fewer steps vs peers: speed and quality in one run")
    _model_or_pipeline(bench, "benchmark")
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument(
        "--policies",
        default=None,
        help="comma-separated presets, optionally with overrides (preset:key=value); default: every method",
    )
    bench.add_argument("--peers", action="store_true", help="also run cache-dit and diffusers' cache hooks")
    bench.add_argument("--samples", type=int, default=16)
    bench.add_argument(
        "--repeats", type=int, default=3, help="timed rounds, interleaved, each one row later (median reported)"
    )
    bench.add_argument("--fewer-steps", default=None, help="comma-separated step counts (default: steps/1.5../5)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--cfg", default="separate", choices=("separate", "batched"), help="CFG as 2 forwards per step or 1 batched"
    )
    bench.add_argument("--out", default="bench-out", help="folder for bench.json/csv/md/png")
    bench.add_argument(
        "--parallel",
        default="none",
        choices=("none", "data"),
        help="under torchrun: data = shard the samples over the processes (docs/PARALLEL.md; default none)",
    )
    bench.set_defaults(func=_cmd_bench)

    an = sub.add_parser("analyze", help="reproduce a paper's analysis on a reference model")
    an.add_argument("study", choices=("precisecache",), help="precisecache: single-step reuse impact vs LFD")
    an.add_argument("--model", default="ref-image", choices=REF_MODELS)
    an.add_argument("--steps", type=int, default=50)
    an.add_argument("--samples", type=int, default=8)
    an.add_argument("--out", default="analysis-out")
    an.set_defaults(func=_cmd_analyze)

    cal = sub.add_parser(
        "calibrate", help="offline calibration of a method on a reference model or your pipeline (JSON profile)"
    )
    cal.add_argument(
        "method",
        type=_calibration_method,
        choices=CALIBRATION_METHODS,
        help="omnicache-trajectory (presets omnicache-traj-slow/fast; formerly `omnicache`), omnicache-layered "
        "(presets omnicache-layered-2x/3x), mixcache, teacache, precisecache or tokencache (trains the Cache "
        "Predictor and LoRA refiners; weights next to the profile)",
    )
    _model_or_pipeline(cal, "calibrate on")
    cal.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="with --pipeline: the CFG scale (default: from --call true_cfg_scale= or guidance_scale=)",
    )
    cal.add_argument(
        "--speedup",
        type=float,
        action="append",
        default=None,
        help="omnicache-layered: MACs speedup of a schedule listed in the profile, repeatable (default 2 and 3; "
        "the policy computes the schedule at its own layered_speedup from the profile's loss table)",
    )
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--samples", type=int, default=8)
    cal.add_argument(
        "--data",
        default="samples",
        choices=("samples", "dataset"),
        help="reference models: calibrate on the model's own samples (default) or on its training data noised "
        "to every step (TokenCache's Algorithm 1)",
    )
    cal.add_argument("--seed", type=int, default=1)
    cal.add_argument("--out", default=None, help="profile path (default: the package's shipped profiles)")
    cal.set_defaults(func=_cmd_calibrate)

    tune = sub.add_parser(
        "tune", help="pick the best config at a MACs speedup on a reference model or your pipeline (auto:speedup=N)"
    )
    _model_or_pipeline(tune, "tune on")
    tune.add_argument("--steps", type=int, default=50, help="sampling steps (the tuned profile is per step count)")
    tune.add_argument("--speedup", type=float, required=True, help="MACs speedup to reach, > 1 (e.g. 2)")
    tune.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="with --pipeline: the CFG scale (default: from --call true_cfg_scale= or guidance_scale=)",
    )
    tune.add_argument("--samples", type=int, default=8, help="reference models: samples, classes cycled (default 8)")
    tune.add_argument("--seed", type=int, default=None, help="generator seed (default 0; reference models 1)")
    tune.add_argument(
        "--candidates", default=None, help="comma-separated presets with overrides (default: every preset + a grid)"
    )
    tune.add_argument("--out", default=None, help="reference models: profile path (default: user profile directory)")
    tune.set_defaults(func=_cmd_tune)

    ev = sub.add_parser("evaluate", help="quality of a reference model at several step counts (uncached)")
    ev.add_argument("model", choices=REF_MODELS)
    ev.add_argument("--samples", type=int, default=32)
    ev.add_argument("--steps", default="50,25,17,10,5", help="comma-separated; the first is the reference")
    ev.set_defaults(func=_cmd_evaluate)

    add_compare_parser(sub, REF_MODELS)
    sub.add_parser("presets", help="list policy presets").set_defaults(func=_cmd_presets)
    sub.add_parser("models", help="list supported model classes and reference models").set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(getattr(args, "steps", None), int) and args.steps < 1:
        print("ditcache: --steps must be a positive integer", file=sys.stderr)
        return 2
    try:
        # Only training needs autograd; restored on return (main may run in-process, e.g. in tests).
        with torch.set_grad_enabled(args.command == "train-ref"):
            return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"ditcache: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
