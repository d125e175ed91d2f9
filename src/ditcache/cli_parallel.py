"""The CLI's parallel paths: `ditcache generate|bench --parallel data|ulysses` under torchrun.

`--parallel data` shards the samples over the processes (`ditcache.parallel.data`); `--parallel ulysses`
(generate only) splits each sample's tokens (`ditcache.parallel.context_cli`). Only rank 0 prints, writes files
and scores; the other ranks run with stdout and stderr muted and exit with status 2 when the command failed
(rank 0 reports the error).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator

CONTEXT_MODES = ("ulysses", "ring")  # each sample's tokens split over the ranks (ditcache.parallel.context_cli)
PARALLEL_MODES = ("none", "data", *CONTEXT_MODES)
BENCH_PARALLEL_MODES = ("none", "data")


def generate_parallel(args: argparse.Namespace) -> int:
    """`ditcache generate --parallel data|ulysses|ring`."""
    _check_mode(args, "generate", PARALLEL_MODES)
    if args.parallel in CONTEXT_MODES:
        from .parallel.context_cli import generate_context_parallel

        return _in_group(lambda a, info: generate_context_parallel(a), args)
    return _in_group(_generate_data, args)


def bench_parallel(args: argparse.Namespace) -> int:
    """`ditcache bench --parallel data`."""
    _check_mode(args, "bench", BENCH_PARALLEL_MODES)
    return _in_group(_bench_data, args)


def _check_mode(args: argparse.Namespace, command: str, modes: tuple[str, ...]) -> None:
    """Clear errors before joining a group: wrong mode, a user pipeline, or no torchrun."""
    from .parallel import launched_by_torchrun

    mode = args.parallel
    if mode not in modes or mode == "none":
        raise ValueError(f"--parallel must be one of {', '.join(modes)} for {command}, got {mode!r}")
    if args.pipeline is not None:
        raise ValueError(
            f"--parallel {mode} supports reference models (--model) only, not --pipeline; for your own pipeline "
            "use ditcache.parallel in Python (docs/PARALLEL.md), or split your --prompts file and run one "
            f"`ditcache {command} --pipeline ...` per device"
        )
    if not launched_by_torchrun():
        raise ValueError(
            f"--parallel {mode} needs one process per device: launch it with `torchrun --nproc_per_node N -m "
            f"ditcache {command} --parallel {mode} ...` (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set)"
        )


def _in_group(command: Callable[[argparse.Namespace, object], int], args: argparse.Namespace) -> int:
    """Join the torchrun group, run `command(args, info)` (muted on ranks other than 0), leave the group."""
    import torch.distributed as dist

    from .cli_pipeline import _reference_model
    from .parallel import init_distributed

    _reference_model(args)
    info = init_distributed()
    try:
        if info.is_main:
            code = command(args, info)
        else:
            with _muted():
                try:
                    code = command(args, info)
                except Exception:  # the same error is raised on rank 0, which reports it
                    code = 2
        # leave together: a rank tearing its gloo connections down while another still uses them can abort
        dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _muted() -> Iterator[None]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _generate_data(args: argparse.Namespace, info: object) -> int:
    from .cli_report import report_generation
    from .parallel.data import generate_data_parallel
    from .refmodels import RefPipeline, get_spec
    from .refmodels.evaluate import balanced_labels
    from .registry import parse_policy

    parse_policy(args.policy)  # a bad name fails on every rank alike, before any generation
    pipe = RefPipeline.from_pretrained(args.model)
    labels = balanced_labels(args.samples, get_spec(args.model).num_classes)
    run = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, cfg_mode=args.cfg)
    reference = generate_data_parallel(pipe, labels, None, info=info, **run) if args.policy != "none" else None
    result = generate_data_parallel(pipe, labels, args.policy, info=info, **run)
    if result is None:  # not rank 0
        return 0
    rows = [shard.rows for shard in result.shards]
    print(f"data parallel: {len(rows)} processes, samples per process {rows}")
    print("seconds per process: " + ", ".join(f"{s:.2f}" for s in result.rank_seconds))
    if reference is not None:
        print(f"uncached: {reference.seconds:.2f} s")
    return report_generation(
        args,
        result.samples,
        labels,
        None if reference is None else reference.samples,
        result.seconds,
        None if reference is None else reference.seconds,
        result.stats,
        rank_seconds=list(result.rank_seconds),
        samples_per_rank=rows,
    )


def _bench_data(args: argparse.Namespace, info: object) -> int:
    from .bench import write_files
    from .bench.report import report_markdown
    from .cli_report import bench_config
    from .parallel.data import bench_data_parallel

    config = bench_config(args)
    result = bench_data_parallel(config, info)
    if result is None:  # not rank 0
        return 0
    print(f"machine: {result.machine}")
    print(report_markdown(result))
    for path in write_files(result, args.out):
        print(f"wrote {path}")
    return 0
