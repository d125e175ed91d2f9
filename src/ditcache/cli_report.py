"""What `ditcache generate` prints and writes, and the bench config it builds: one copy for every mode
(one process, `--parallel data`, `--parallel ulysses|ring`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch


def report_generation(
    args: argparse.Namespace,
    samples: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None,
    seconds: float,
    base_seconds: float | None,
    stats: Any,
    **json_extra: Any,
) -> int:
    """Write the samples (`--out`), score them against the uncached `reference`, print the timing, stats and
    metrics (and `--json`: the same plus `json_extra`); returns the exit status."""
    from .refmodels.evaluate import score
    from .visual import save_samples

    written = save_samples(samples, args.out)
    metrics = score(args.model, samples, labels, reference)
    print(f"{args.model}, {args.steps} steps, policy {args.policy}: {seconds:.2f} s for {args.samples} samples")
    if reference is not None and base_seconds is not None:
        print(f"wall-clock speedup {base_seconds / seconds:.2f}x, MACs speedup {stats.macs_speedup:.2f}x")
    print(stats.summary())
    print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print("wrote " + ", ".join(str(p) for p in written))
    if args.json:
        payload = {"seconds": seconds, **json_extra, "metrics": metrics, "stats": stats.to_dict()}
        payload["files"] = [str(p) for p in written]
        print(json.dumps(payload, indent=2, default=float))
    return 0


def bench_selection(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """`ditcache bench`'s `--policies` (default: every method) and `--fewer-steps` (default: None)."""
    from .bench.runner import DEFAULT_POLICIES
    from .cli_pipeline import split_policies

    policies = split_policies(args.policies) if args.policies is not None else DEFAULT_POLICIES
    fewer = tuple(int(n) for n in args.fewer_steps.split(",")) if args.fewer_steps else None
    return policies, fewer


def bench_config(args: argparse.Namespace) -> Any:
    """The `BenchConfig` of `ditcache bench`'s arguments for a reference model."""
    from .bench import BenchConfig

    policies, fewer = bench_selection(args)
    return BenchConfig(
        model=args.model,
        steps=args.steps,
        policies=policies,
        peers=args.peers,
        samples=args.samples,
        repeats=args.repeats,
        seed=args.seed,
        cfg_mode=args.cfg,
        fewer_steps=fewer,
    )
