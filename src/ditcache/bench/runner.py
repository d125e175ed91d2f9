"""The benchmark runner: every variant on the same model, labels and seeds, in one process.

Timed runs are interleaved (round-robin over variants, `repeats` rounds, each round starting one variant later)
so that machine drift and the position in a round hit every variant alike; a variant's time is the median of
its rounds (every round is kept in `Row.rounds`: on a shared machine the speed drifts by 10-30 % within a
run, and neither the fastest round nor the median removes that), and speed is its ratio to the uncached baseline
of the same run. MACs are counted
for every variant the same way, with `torch.utils.flop_counter` over one whole generation, so peers and
ditcache policies are measured by the same ruler. Quality is scored on the first run of each variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..engine.macs import _custom_mapping
from ..refmodels.evaluate import balanced_labels, score
from .peers import cache_dit_peers, calibrate_mag_ratios, diffusers_peers
from .variants import Variant, baseline, ditcache_policy, fewer_steps

DEFAULT_POLICIES = (
    "fora-2",
    "fora-3",
    "teacache-0.1",
    "precisecache-base",
    "precisecache-turbo",
    "precisecache-flash",
    "mixcache-acc",
    "mixcache-eff",
    "omnicache-traj-slow",
    "omnicache-traj-fast",
    "tokencache",
    "omnicache-hier",
)


@dataclasses.dataclass
class Row:
    label: str
    kind: str
    steps: int
    status: str = "ok"  # "ok" | "skipped" | "failed"
    reason: str = ""
    seconds: float = float("nan")  # wall time of one generation: the median of the timed rounds
    speedup: float = float("nan")  # baseline seconds / these seconds
    macs: float = float("nan")
    macs_speedup: float = float("nan")
    efficiency: float = float("nan")  # speedup / macs_speedup (1.0 = overhead-free)
    psnr: float = float("nan")
    ssim: float = float("nan")
    accuracy: float = float("nan")
    fd: float = float("nan")
    fd_spectrum: float = float("nan")
    temporal: float = float("nan")
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    rounds: list[float] = dataclasses.field(default_factory=list)  # seconds of every timed round, in order


@dataclasses.dataclass
class BenchConfig:
    model: str = "ref-image"
    steps: int = 50
    policies: tuple[str, ...] = DEFAULT_POLICIES
    peers: bool = False
    samples: int = 16
    repeats: int = 3
    seed: int = 0
    guidance: float | None = None  # None: the reference model's default scale
    cfg_mode: str = "separate"  # "separate": cond and uncond forwards; "batched": one forward of both
    fewer_steps: tuple[int, ...] | None = None  # default: steps * (1/2, 1/3, 1/4, 1/5)

    def __post_init__(self) -> None:
        for name in ("steps", "samples", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg_mode not in ("separate", "batched"):
            raise ValueError(f"cfg_mode must be 'separate' or 'batched', got {self.cfg_mode!r}")
        if self.fewer_steps is None:
            self.fewer_steps = tuple(sorted({max(2, round(self.steps / d)) for d in (1.5, 2, 3, 4, 5)}, reverse=True))


@dataclasses.dataclass
class BenchResult:
    config: BenchConfig
    rows: list[Row]
    machine: str


def build_variants(config: BenchConfig, pipe: Any, run_for: Callable[[int], Callable[[], Any]]) -> list[Variant]:
    variants = [baseline(config.steps)]
    variants += [fewer_steps(n) for n in config.fewer_steps if n < config.steps]
    variants += [ditcache_policy(name, config.steps) for name in config.policies]
    if config.peers:
        try:
            mag = calibrate_mag_ratios(pipe, run_for(config.steps), config.steps)
        except Exception as error:  # a peer's failure is a row, not a crash
            mag = None
            variants.append(Variant("diffusers MagCache", "peer", config.steps, skip_reason=f"calibration: {error}"))
        variants += diffusers_peers(config.steps, mag)
        num_blocks = sum(
            len(getattr(pipe.transformer, a, [])) for a in ("transformer_blocks", "single_transformer_blocks", "blocks")
        )
        variants += cache_dit_peers(config.steps, num_blocks)
    return variants


def _count_macs(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return counter.get_total_flops() // 2


def run_bench(config: BenchConfig, pipe: Any = None, progress: bool = True) -> BenchResult:
    with torch.no_grad():
        return _run_bench(config, pipe, progress)


def _run_bench(config: BenchConfig, pipe: Any, progress: bool) -> BenchResult:
    from ..refmodels import RefPipeline

    pipe = pipe if pipe is not None else RefPipeline.from_pretrained(config.model)
    labels = balanced_labels(config.samples, pipe.spec.num_classes)
    run_for = reference_runs(pipe, labels, config.guidance, config.seed, config.cfg_mode)
    return run_variants(
        config, pipe, run_for, lambda out, ref: score(config.model, out, labels, ref), progress=progress
    )


def reference_runs(
    pipe: Any, labels: torch.Tensor, guidance: float | None, seed: int, cfg_mode: str
) -> Callable[[int], Callable[[], Any]]:
    """`run_for(steps)`: one generation of a reference pipeline with these labels, scale, seed and CFG mode."""

    def run_for(steps: int) -> Callable[[], Any]:
        return lambda: pipe(labels, num_inference_steps=steps, guidance_scale=guidance, seed=seed, cfg_mode=cfg_mode)

    return run_for


def run_variants(
    config: BenchConfig,
    pipe: Any,
    run_for: Callable[[int], Callable[[], Any]],
    score_fn: Callable[[Any, Any], dict[str, float]],
    progress: bool = True,
) -> BenchResult:
    """Time, count and score every variant of `config` on any pipeline: `run_for(steps)` is one generation,
    `score_fn(output, uncached_output)` its quality metrics (Row field names). Call under `torch.no_grad()`."""
    variants = build_variants(config, pipe, run_for)
    rows = {v.label: Row(v.label, v.kind, v.steps) for v in variants}
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    outputs: dict[str, torch.Tensor] = {}
    runnable = []
    for v in variants:
        if v.available:
            runnable.append(v)
        else:
            rows[v.label].status, rows[v.label].reason = "skipped", v.skip_reason

    def generate(v: Variant) -> torch.Tensor:
        detach = v.attach(pipe) if v.attach else None
        try:
            start = time.perf_counter()
            out = run_for(v.steps)()
            times[v.label].append(time.perf_counter() - start)
        except BaseException:
            if detach:
                with contextlib.suppress(Exception):  # keep the original error, not a detach error
                    detach()
            raise
        rows[v.label].extra.update(detach() if detach else {})
        return out

    run_for(config.steps)()  # warm-up, untimed
    bar = tqdm(total=len(runnable) * (config.repeats + 1), desc="bench", disable=not progress)
    for round_index in range(config.repeats):
        first = round_index % max(1, len(runnable))
        for v in runnable[first:] + runnable[:first]:
            try:
                out = generate(v)
                if round_index == 0:
                    outputs[v.label] = out
            except Exception as error:
                rows[v.label].status, rows[v.label].reason = "failed", f"{type(error).__name__}: {error}"[:200]
                runnable.remove(v)
            bar.update(1)
    for v in runnable:  # MACs: one counted generation each, outside the timed rounds
        detach = v.attach(pipe) if v.attach else None
        try:
            rows[v.label].macs = _count_macs(run_for(v.steps))
        finally:
            if detach:
                detach()
        bar.update(1)
    bar.close()

    base = rows[variants[0].label]
    base_seconds = statistics.median(times[base.label])
    reference = outputs[base.label]
    for v in runnable:
        row = rows[v.label]
        row.rounds = times[v.label]
        row.seconds = statistics.median(row.rounds)
        row.speedup = base_seconds / row.seconds
        row.macs_speedup = base.macs / row.macs if row.macs else float("nan")
        row.efficiency = row.speedup / row.macs_speedup
        metrics = score_fn(outputs[v.label], reference)
        for key, value in metrics.items():
            setattr(row, key, value)
    return BenchResult(config=config, rows=list(rows.values()), machine=_machine())


# glibc's malloc settings read at process start, and allocators swapped in with LD_PRELOAD: on CPU they move
# the wall clock by up to 40 % (glibc hands freed activations back to the OS and the next forward page-faults
# them in again, most after cheap reused steps), so a bench result names the allocator it ran with.
_ALLOCATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def allocator_description(environ: Mapping[str, str]) -> str:
    """The host allocator a process started with `environ` uses: preloaded allocators and glibc malloc
    variables, or "default allocator"."""
    preloaded = [
        Path(item).name
        for item in environ.get("LD_PRELOAD", "").replace(":", " ").split()
        if "malloc" in Path(item).name  # jemalloc, tcmalloc, mimalloc
    ]
    settings = [f"{name}={environ[name]}" for name in _ALLOCATOR_VARIABLES if name in environ]
    return ", ".join(preloaded + settings) or "default allocator"


def _machine() -> str:
    import os
    import platform

    return (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{allocator_description(os.environ)}"
    )
