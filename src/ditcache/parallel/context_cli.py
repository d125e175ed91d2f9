"""`torchrun --nproc_per_node N -m ditcache generate --parallel ulysses|ring`: one generation sharded over ranks.

Every rank loads the reference model, shards its tokens with diffusers' context parallelism
(`enable_context_parallel`), samples the uncached reference and the cached generation together (each forward
is a collective), and asks for the stats (MACs are measured with a forward, also a collective). Rank 0 alone
prints, scores and writes the samples.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from .context import enable_context_parallel, supports_context_parallel
from .launch import init_distributed

DEGREES = {"ulysses": lambda world: {"ulysses_degree": world}, "ring": lambda world: {"ring_degree": world}}


def generate_context_parallel(args: argparse.Namespace) -> int:
    """The `generate` command under context parallelism (`args.parallel` is "ulysses" or "ring"; the CLI has
    checked the launch and refused `--pipeline`, `cli_parallel._check_mode`)."""
    from .. import apply
    from ..cli_report import report_generation
    from ..refmodels import RefPipeline, get_spec
    from ..refmodels.evaluate import balanced_labels

    info = init_distributed()
    pipe = RefPipeline.from_pretrained(args.model)
    if not supports_context_parallel(pipe.transformer):
        raise SystemExit(
            f"--parallel {args.parallel}: {args.model} ({type(pipe.transformer).__name__}) has no context-parallel "
            "plan in diffusers; use ref-image or ref-video, or --parallel data"
        )
    enable_context_parallel(pipe.transformer, **DEGREES[args.parallel](info.world_size))
    labels = balanced_labels(args.samples, get_spec(args.model).num_classes)
    run = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, cfg_mode=args.cfg)

    reference, base_seconds = None, float("nan")
    if args.policy != "none":
        reference, base_seconds = _timed(lambda: pipe(labels, **run))
    handle = apply(pipe, args.policy)
    try:
        samples, seconds = _timed(lambda: pipe(labels, **run))
        stats = handle.stats()  # every rank: measuring MACs runs the sharded model
    finally:
        handle.remove()
    if not info.is_main:
        return 0
    print(f"context parallel: --parallel {args.parallel} over {info.world_size} ranks (MACs per rank)")
    if reference is not None:
        print(f"uncached: {base_seconds:.2f} s")
    return report_generation(args, samples, labels, reference, seconds, base_seconds, stats, ranks=info.world_size)


def _timed(generate: object) -> tuple[torch.Tensor, float]:
    """Ranks start together, so a rank's seconds are the sharded generation's wall-clock."""
    dist.barrier()
    start = time.perf_counter()
    out = generate()
    dist.barrier()
    return out, time.perf_counter() - start
