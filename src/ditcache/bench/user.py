"""`ditcache bench --pipeline SPEC`: the benchmark on the user's own diffusers pipeline and prompts.

Same runner as the reference-model bench (`run_variants`: interleaved timed rounds, median wall-clock, MACs
of one whole pipeline call counted by `torch.utils.flop_counter` for every variant), scored by PSNR and SSIM
against the uncached output of the same prompts and seed (there is no class label or data set to score).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..metrics.quality import psnr, ssim
from ..userpipe import generate
from .report import _fmt, _json_default, _notes, to_dict, write_files
from .runner import BenchConfig, BenchResult, run_variants

FEWER_STEPS_DIVISORS = (1.5, 2, 3)
COLUMNS = (
    ("label", "method", "{}"),
    ("steps", "steps", "{}"),
    ("macs_speedup", "MACs speedup", "{:.2f}x"),
    ("speedup", "wall speedup", "{:.2f}x"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
)


def run_user_bench(
    pipe: Any,
    prompts: Sequence[str],
    *,
    steps: int,
    policies: Sequence[str],
    call: dict[str, Any] | None = None,
    repeats: int = 3,
    seed: int = 0,
    fewer_steps: Sequence[int] | None = None,
    peers: bool = False,
    name: str = "pipeline",
    progress: bool = True,
) -> BenchResult:
    """Uncached, fewer steps (default steps/1.5, /2, /3) and each policy on `pipe(prompt=prompts, **call)`."""
    call = dict(call or {})
    if fewer_steps is None:
        fewer_steps = sorted({max(1, round(steps / d)) for d in FEWER_STEPS_DIVISORS}, reverse=True)
    config = BenchConfig(
        model=name,
        steps=steps,
        policies=tuple(policies),
        peers=peers,
        samples=len(prompts),
        repeats=repeats,
        seed=seed,
        guidance=float("nan"),  # the pipeline's own argument, if any, is in `call`
        fewer_steps=tuple(fewer_steps),
    )
    if progress and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole bench, not one per generation

    def run_for(n: int):
        return lambda: generate(pipe, prompts, n, seed, call)

    def score(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        return {"psnr": psnr(output, reference), "ssim": ssim(output, reference)}

    with torch.no_grad():
        return run_variants(config, pipe, run_for, score, progress=progress)


def markdown_table(result: BenchResult) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " | notes |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in result.rows:
        cells = [_fmt(fmt, getattr(row, key)) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + f" | {_notes(row)} |")
    return "\n".join(lines)


def write_user_files(result: BenchResult, out_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """bench.json (with `meta`: the pipeline spec, prompts, call arguments), .csv, .md and the Pareto .png."""
    written = write_files(result, out_dir)
    json_path, _, md_path, _ = written
    json_path.write_text(json.dumps({**to_dict(result), **meta}, indent=2, default=_json_default) + "\n")
    md_path.write_text(f"machine: {result.machine}\n\n{markdown_table(result)}\n")
    return written
