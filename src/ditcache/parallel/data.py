"""Data-parallel generation: the samples of one batch split over the ranks of a process group.

Each rank generates a contiguous shard of the batch rows with the policy attached to its own copy of the
pipeline; rank 0 gathers the samples (in batch order), the per-rank stats (combined by `merge_stats`) and the
per-rank wall-clock seconds. The initial noise of the whole batch is drawn from the one seed on every rank and
each rank takes its rows (`latents=`), so a sample's noise does not depend on the number of ranks.

What is identical to one process, and what is not:

* Policies whose decisions do not look at the batch (no cache, static schedules such as `fora-N`) compute the
  same thing per sample as one process: batch rows are independent in the engine. Only float32 rounding
  differs, because matmul kernels block differently at another batch size (max abs diff ~1e-5 on ref-image).
* Dynamic step- and block-level methods (TeaCache, PreciseCache, MixCache; `auto` when it resolves to one)
  decide from statistics of the whole batch (a rel-L1 or a norm over every row). Every such statistic passes
  the engine's `DecisionSync`; the ranks holding rows are made its decision group with `Sharding.ROWS`
  (`set_decision_group`), so the sums and counts are all-reduced and every rank takes the whole batch's
  decision, as one process does.
* Token-level methods: OmniCache's caches match per row (per sample); TokenCache's Eq. 12 allocation and its
  tokens shared by the rows read every rank's rows through `DecisionSync.gather_rows`, so they too take the
  whole batch's choices.

A rank with no rows (fewer samples than ranks) skips the generation but still joins every collective, so no
rank waits forever. An error on any rank is gathered and re-raised on every rank (the first failing rank's);
only an error in the middle of a synchronised generation leaves the other ranks in an all-reduce until the
group's timeout. Results travel as JSON and tensors (`transport`), never pickle.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..engine.decisions import Sharding
from ..engine.stats import GenerationStats, Stats
from .context import set_decision_group
from .launch import DistributedInfo, init_distributed
from .transport import all_gather_json, all_gather_tensors

__all__ = [
    "DataParallelResult",
    "Shard",
    "ShardOutcome",
    "gather_outcomes",
    "generate_data_parallel",
    "merge_stats",
    "shard_rows",
]


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of a batch of `total` rows: what one rank generates."""

    rank: int
    start: int
    stop: int
    total: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a tensor whose first axis is the batch."""
        return batch[self.start : self.stop]


def shard_rows(total: int, world_size: int, rank: int) -> Shard:
    """Contiguous, balanced shards: the first `total % world_size` ranks get one row more, so concatenating the
    shards in rank order gives the batch order. Ranks past `total` get an empty shard."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative integer, got {total!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size) with world_size >= 1, got rank {rank}, {world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return Shard(rank, start, start + base + (rank < extra), total)


@dataclasses.dataclass
class ShardOutcome:
    """What one rank sends to rank 0: its samples, stats and seconds, or the error it raised."""

    shard: Shard
    samples: torch.Tensor | None = None
    stats: Stats | None = None
    seconds: float = 0.0
    error: BaseException | None = None


@dataclasses.dataclass
class DataParallelResult:
    """The whole batch, on rank 0: samples in batch order, stats combined over ranks, seconds per rank."""

    samples: torch.Tensor
    stats: Stats | None  # None when no policy was attached
    rank_seconds: tuple[float, ...]
    shards: tuple[Shard, ...]

    @property
    def seconds(self) -> float:
        """Wall-clock of the batch: the slowest rank (ranks start together after a barrier)."""
        return max(self.rank_seconds)


def gather_outcomes(outcome: ShardOutcome, info: DistributedInfo) -> list[ShardOutcome] | None:
    """Every rank's outcome on rank 0 (rank order), None elsewhere, as JSON and tensors (`transport`, never
    pickle). Raises on every rank the error of the first rank that failed (its own on the failing rank), so a
    failure on one rank neither hangs nor passes silently on the others."""
    metas = all_gather_json(
        {
            "shard": dataclasses.asdict(outcome.shard),
            "seconds": outcome.seconds,
            "stats": None if outcome.stats is None else outcome.stats.to_dict(),
        },
        info,
    )
    raise_first_error(outcome.error, info)
    samples = all_gather_tensors([outcome.samples], info)
    if not info.is_main:
        return None
    return [
        ShardOutcome(
            Shard(**meta["shard"]),
            samples[rank][0],
            None if meta["stats"] is None else Stats.from_dict(meta["stats"]),
            meta["seconds"],
        )
        for rank, meta in enumerate(metas)
    ]


def raise_first_error(error: BaseException | None, info: DistributedInfo) -> None:
    """A collective: re-raise `error` on the rank that had it and the first failing rank's message elsewhere."""
    messages = all_gather_json(None if error is None else f"{type(error).__name__}: {error}", info)
    if error is not None:
        raise error
    failed = next((rank for rank, message in enumerate(messages) if message is not None), None)
    if failed is not None:
        raise RuntimeError(f"rank {failed} failed: {messages[failed]}")


def generate_data_parallel(
    pipe: Any,
    labels: torch.Tensor | Sequence[int],
    policy: Any = None,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    seed: int = 0,
    cfg_mode: str = "separate",
    info: DistributedInfo | None = None,
) -> DataParallelResult | None:
    """Generate `labels` with a reference pipeline (`RefPipeline`), sharded over the ranks of the process group.

    Every rank calls this with the same arguments. `policy` is what `ditcache.apply` takes (a preset name or a
    config), or None for the pipeline without a cache. Returns the whole batch on rank 0 and None elsewhere.
    """
    info = info or init_distributed()
    labels = torch.as_tensor(labels, dtype=torch.long)
    shard = shard_rows(len(labels), info.world_size, info.rank)
    # The whole batch's noise from the one seed, then this shard's rows: each sample's noise is the one it gets
    # in a one-process run, whatever the number of ranks.
    latents = shard.take(pipe.initial_noise(len(labels), seed))
    run = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, cfg_mode=cfg_mode)
    outcome = ShardOutcome(shard)
    group = _decision_group(len(labels), info) if policy is not None else None  # whole-batch decisions
    dist.barrier()  # ranks start together, so the slowest rank's seconds are the batch's wall-clock
    try:
        set_decision_group(pipe.transformer, group, Sharding.ROWS)
        outcome.samples, outcome.stats, outcome.seconds = _generate_shard(
            pipe, shard.take(labels), latents, policy, run
        )
    except Exception as error:  # gathered and re-raised on every rank
        outcome.error = error
    finally:
        _release(pipe, group)
    gathered = gather_outcomes(outcome, info)
    if gathered is None:
        return None
    stats = merge_stats([o.stats for o in gathered], [o.shard.rows for o in gathered]) if policy is not None else None
    return DataParallelResult(
        samples=torch.cat([o.samples for o in gathered]),
        stats=stats,
        rank_seconds=tuple(o.seconds for o in gathered),
        shards=tuple(o.shard for o in gathered),
    )


def _release(pipe: Any, group: Any) -> None:
    set_decision_group(pipe.transformer, None)
    if group is not None and group is not dist.group.WORLD:
        dist.destroy_process_group(group)


def _decision_group(total: int, info: DistributedInfo) -> Any:
    """The ranks that hold rows, as a process group, on those ranks (None on the others): a rank with no rows
    runs no forward, so it must not be in the group the statistics are all-reduced over."""
    holders = [rank for rank in range(info.world_size) if shard_rows(total, info.world_size, rank).rows]
    if len(holders) == info.world_size:
        return dist.group.WORLD
    group = dist.new_group(holders)  # a collective of every rank, members or not
    return group if info.rank in holders else None


def _generate_shard(
    pipe: Any, labels: torch.Tensor, latents: torch.Tensor, policy: Any, run: dict[str, Any]
) -> tuple[torch.Tensor, Stats | None, float]:
    if len(labels) == 0:  # nothing to generate; the rank still joins the gather
        return latents.clone(), None, 0.0
    from .. import apply

    handle = apply(pipe, policy) if policy is not None else None
    try:
        start = time.perf_counter()
        samples = pipe(labels, latents=latents, **run)
        seconds = time.perf_counter() - start
        stats = handle.stats() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    return samples, stats, seconds


def merge_stats(per_rank: Sequence[Stats | None], rows: Sequence[int]) -> Stats | None:
    """The stats of the whole batch from the stats of its shards (rank order; None or no generations for a
    rank with no rows), read through their public fields.

    Generation i of every rank is one generation of the batch, described as if one process had run it:
    MACs, decide seconds, non-finite events and cache bytes are summed; a forward is reused when every shard
    reused it (the same (step, branch)); a forward reused on some shards but computed on others computed only
    part of the batch, so it counts in `partial_batch_forwards` (with the shards' own partial forwards: an
    upper bound when both happen at one forward); per-sample and per-forward fractions (`block_tokens`,
    `blocks_computed`, `token_fraction`) are means weighted by the shards' rows; forward and step counts and
    trial forwards are the largest over shards (every shard runs the same steps). Raises ValueError when
    shards ran different numbers of generations.
    """
    if len(per_rank) != len(rows):
        raise ValueError(f"per_rank and rows must have the same length, got {len(per_rank)} and {len(rows)}")
    shards = [(s, n) for s, n in zip(per_rank, rows) if s is not None and n > 0 and s.generations]
    if not shards:
        return None
    counts = {len(s.generations) for s, _ in shards}
    if len(counts) != 1:
        raise ValueError(f"shards ran different numbers of generations: {sorted(counts)}")
    generations = [
        _merge_generation([(s.generations[i], n) for s, n in shards]) for i in range(len(shards[0][0].generations))
    ]
    return Stats(
        policy=shards[0][0].policy,
        generations=generations,
        cache_bytes=sum(s.cache_bytes for s, _ in shards),
        dropped_generations=max(s.dropped_generations for s, _ in shards),
        dropped_forwards=sum(s.dropped_forwards for s, _ in shards),
    )


def _merge_generation(parts: list[tuple[GenerationStats, int]]) -> GenerationStats:
    first = parts[0][0]
    total_rows = sum(n for _, n in parts)
    reused_sets = [set(g.reused) for g, _ in parts]
    everywhere = set.intersection(*reused_sets)
    somewhere = set.union(*reused_sets)
    forwards = max(g.forwards for g, _ in parts)
    reused = [key for key in first.reused if key in everywhere]
    partial = max(g.partial_batch_forwards for g, _ in parts) + len(somewhere - everywhere)

    def row_mean(values: Sequence[float]) -> float:
        return sum(v * n for v, (_, n) in zip(values, parts)) / total_rows

    def row_mean_lists(lists: Sequence[Sequence[float]]) -> list[float]:
        return [row_mean(column) for column in zip(*lists)]

    return GenerationStats(
        generation=first.generation,
        forwards=forwards,
        steps=max(g.steps for g, _ in parts),
        computed_forwards=forwards - len(reused),
        reused_forwards=len(reused),
        reused=reused,
        blocks_computed=row_mean_lists([g.blocks_computed for g, _ in parts]),
        blocks_total=first.blocks_total,
        token_fraction=row_mean([g.token_fraction for g, _ in parts]),
        block_tokens=[round(v) for v in row_mean_lists([g.block_tokens for g, _ in parts])],
        trial_forwards=max(g.trial_forwards for g, _ in parts),
        partial_batch_forwards=min(partial, forwards - len(reused)),
        macs_full=sum(g.macs_full for g, _ in parts),
        macs_executed=sum(g.macs_executed for g, _ in parts),
        decide_seconds=sum(g.decide_seconds for g, _ in parts),
        nonfinite_events=sum(g.nonfinite_events for g, _ in parts),
    )


@dataclasses.dataclass
class BenchShard:
    """One rank's bench: its rows (its own medians and MACs), each ok variant's first output, the baseline's."""

    rows: list[Any]  # bench.runner.Row
    outputs: dict[str, torch.Tensor]
    reference: torch.Tensor
    machine: str


def bench_data_parallel(config: Any, info: DistributedInfo | None = None) -> Any:
    """`ditcache.bench.run_bench` with the samples sharded over the ranks (a reference model's `BenchConfig`).

    Every rank runs the whole bench (warm-up, timed rounds, counted MACs) on its shard, with the whole batch's
    noise rows of that shard. Rank 0 merges: a variant's seconds are the slowest rank's median (the batch's
    wall-clock; ranks are not synchronised per generation, they run the same sequence of variants), MACs the sum
    over ranks, speedups recomputed from those, quality scored on the gathered samples of the whole batch;
    `extra` holds rank 0's own stats plus `rank_seconds`. A variant that failed on any rank is failed. ditcache
    variants reduce their decision statistics over the ranks (whole-batch decisions); the peers (diffusers'
    MagCache calibration included) decide on each shard. Returns the `BenchResult` on rank 0, None elsewhere.
    """
    from ..refmodels import RefPipeline
    from ..refmodels.evaluate import balanced_labels

    info = info or init_distributed()
    pipe = RefPipeline.from_pretrained(config.model)
    labels = balanced_labels(config.samples, pipe.spec.num_classes)
    shard = shard_rows(config.samples, info.world_size, info.rank)
    payload, failure = None, None
    group = _decision_group(config.samples, info)  # ditcache variants take the whole batch's decisions
    dist.barrier()
    try:
        set_decision_group(pipe.transformer, group, Sharding.ROWS)
        if shard.rows:
            payload = _bench_shard(config, pipe, shard, labels, pipe.initial_noise(config.samples, config.seed))
    except Exception as error:  # gathered and re-raised on every rank
        failure = error
    finally:
        _release(pipe, group)
    raise_first_error(failure, info)
    gathered = gather_bench_shards(payload, info)
    if gathered is None:
        return None
    return _merge_bench(config, labels, gathered, info.world_size)


def gather_bench_shards(payload: BenchShard | None, info: DistributedInfo) -> list[BenchShard] | None:
    """Every rank's bench shard (None for a rank without rows) on rank 0, as JSON rows and tensors."""
    from ..bench.runner import Row

    metas = all_gather_json(
        None
        if payload is None
        else {
            "rows": [dataclasses.asdict(row) for row in payload.rows],
            "outputs": list(payload.outputs),
            "machine": payload.machine,
        },
        info,
    )
    first = next(meta for meta in metas if meta is not None)  # rank 0 always holds rows
    tensors = [None if payload is None else payload.reference]
    tensors += [None if payload is None else payload.outputs.get(label) for label in first["outputs"]]
    gathered = all_gather_tensors(tensors, info)
    if not info.is_main:
        return None
    return [
        BenchShard(
            [Row(**row) for row in meta["rows"]],
            dict(zip(first["outputs"], parts[1:])),
            parts[0],
            meta["machine"],
        )
        for meta, parts in zip(metas, gathered)
        if meta is not None
    ]


def _bench_shard(config: Any, pipe: Any, shard: Shard, labels: torch.Tensor, noise: torch.Tensor) -> BenchShard:
    from ..bench.runner import run_variants

    labels, latents = shard.take(labels), shard.take(noise)
    captured: list[torch.Tensor] = []
    reference: list[torch.Tensor] = []

    def keep_output(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        # run_variants scores the ok variants in row order; quality is scored on rank 0 over the whole batch.
        captured.append(out)
        reference[:] = [ref]
        return {}

    def run_for(steps: int) -> Any:
        run = dict(guidance_scale=config.guidance, seed=config.seed, cfg_mode=config.cfg_mode, latents=latents)
        return lambda: pipe(labels, num_inference_steps=steps, **run)

    shard_config = dataclasses.replace(config, samples=shard.rows)
    with torch.no_grad():
        result = run_variants(shard_config, pipe, run_for, keep_output, progress=shard.rank == 0)
    ok = [row for row in result.rows if row.status == "ok"]
    if len(ok) != len(captured):
        raise RuntimeError(f"bench shard: {len(ok)} ok variants but {len(captured)} outputs")
    outputs = {row.label: out for row, out in zip(ok, captured)}
    return BenchShard(result.rows, outputs, reference[0], result.machine)


def _merge_bench(config: Any, labels: torch.Tensor, shards: list[BenchShard], world_size: int) -> Any:
    from ..bench.runner import BenchResult, Row
    from ..refmodels.evaluate import score

    rows = []
    for i, first in enumerate(shards[0].rows):
        parts = [shard.rows[i] for shard in shards]
        failed = next((p for p in parts if p.status != "ok"), None)
        if failed is not None:
            rows.append(Row(first.label, first.kind, first.steps, status=failed.status, reason=failed.reason))
            continue
        extra = dict(first.extra, rank_seconds=[p.seconds for p in parts])
        row = Row(first.label, first.kind, first.steps, extra=extra)
        row.seconds, row.macs = max(p.seconds for p in parts), sum(p.macs for p in parts)
        rows.append(row)
    base = rows[0]
    reference = torch.cat([shard.reference for shard in shards])
    for row in rows:
        if row.status != "ok":
            continue
        row.speedup = base.seconds / row.seconds
        row.macs_speedup = base.macs / row.macs if row.macs else float("nan")
        row.efficiency = row.speedup / row.macs_speedup
        samples = torch.cat([shard.outputs[row.label] for shard in shards])
        for key, value in score(config.model, samples, labels, reference).items():
            setattr(row, key, value)
    machine = f"{shards[0].machine}; data parallel over {world_size} processes"
    return BenchResult(config=config, rows=rows, machine=machine)
