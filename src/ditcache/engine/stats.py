"""Per-forward records and the statistics a handle reports.

Counts (steps reused, blocks computed, MACs) are deterministic and are what tests assert; seconds are
reported for information only.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch

COMPUTED, REUSED = "computed", "reused"


@dataclasses.dataclass
class ForwardRecord:
    """One call of the model's forward, as the policy handled it."""

    generation: int
    step: int
    branch: str
    shape_key: tuple
    num_blocks: int
    # Shape key of the passes actually run when they covered only part of the batch (`run_rows`).
    executed_key: tuple | None = None
    kind: str = COMPUTED
    # Fraction of each block's tokens computed in the last pass (0.0 = skipped, 1.0 = fully computed).
    block_fraction: list[float] = dataclasses.field(default_factory=list)
    # Image/video tokens per sample each block computed, summed over passes, and the block's token count.
    block_tokens: list[int] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    # Cost sources: full runs per block (priced from the forward's cost table) and token-subset runs,
    # (block position, shape key) priced by a measurement of that block at that shape.
    full_block_runs: list[int] = dataclasses.field(default_factory=list)
    token_runs: list[tuple[int, tuple]] = dataclasses.field(default_factory=list)
    trial_keys: list[tuple] = dataclasses.field(default_factory=list)
    passes: int = 1  # model passes with hooks active (a policy may run a second, cheaper variant)
    skipped_submodules: list[str] = dataclasses.field(default_factory=list)  # e.g. "blocks.3.attn1"
    compute_seconds: float = 0.0
    decide_seconds: float = 0.0
    nonfinite: bool = False

    def __post_init__(self) -> None:
        if not self.block_fraction:
            self.block_fraction = [0.0] * self.num_blocks
        if not self.block_tokens:
            self.block_tokens = [0] * self.num_blocks
        if not self.full_block_runs:
            self.full_block_runs = [0] * self.num_blocks


@dataclasses.dataclass
class GenerationStats:
    generation: int
    forwards: int
    steps: int
    computed_forwards: int
    reused_forwards: int
    reused: list[tuple[int, str]]  # (step, branch) of every reused forward
    blocks_computed: list[float]  # per forward: number of blocks computed (token-weighted)
    blocks_total: int
    token_fraction: float  # computed tokens / tokens of all blocks over all forwards
    block_tokens: list[int]  # per block: image/video tokens per sample computed over the generation
    trial_forwards: int
    partial_batch_forwards: int  # forwards that computed only some batch rows (e.g. the cond half of CFG)
    macs_full: int  # what the uncached model would have spent on the same forwards
    macs_executed: int  # what was spent, trial forwards included
    decide_seconds: float
    nonfinite_events: int

    @property
    def macs_speedup(self) -> float:
        return self.macs_full / self.macs_executed if self.macs_executed else float("inf")

    @property
    def reused_steps(self) -> list[int]:
        return sorted({step for step, _ in self.reused})


@dataclasses.dataclass
class Stats:
    """What `handle.stats()` returns: one entry per generation since apply/reset, plus totals."""

    policy: str
    generations: list[GenerationStats]
    cache_bytes: int
    # Older generations whose records were dropped (`RecordLog`): not in `generations` nor in the totals.
    dropped_generations: int = 0
    dropped_forwards: int = 0

    @property
    def last(self) -> GenerationStats:
        if not self.generations:
            raise ValueError("no generation has run since the cache was applied or reset")
        return self.generations[-1]

    @property
    def macs_full(self) -> int:
        return sum(g.macs_full for g in self.generations)

    @property
    def macs_executed(self) -> int:
        return sum(g.macs_executed for g in self.generations)

    @property
    def macs_speedup(self) -> float:
        return self.macs_full / self.macs_executed if self.macs_executed else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "cache_bytes": self.cache_bytes,
            "macs_speedup": self.macs_speedup,
            "dropped_generations": self.dropped_generations,
            "dropped_forwards": self.dropped_forwards,
            "generations": [dict(dataclasses.asdict(g), macs_speedup=g.macs_speedup) for g in self.generations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        """The inverse of `to_dict` (its derived `macs_speedup` entries are recomputed, not read)."""
        names = {f.name for f in dataclasses.fields(GenerationStats)}
        generations = []
        for entry in data["generations"]:
            fields = {k: v for k, v in entry.items() if k in names}
            fields["reused"] = [(int(step), str(branch)) for step, branch in fields["reused"]]
            generations.append(GenerationStats(**fields))
        return cls(
            policy=data["policy"],
            generations=generations,
            cache_bytes=data["cache_bytes"],
            dropped_generations=data.get("dropped_generations", 0),
            dropped_forwards=data.get("dropped_forwards", 0),
        )

    def summary(self) -> str:
        if not self.generations:
            return f"{self.policy}: no generation yet"
        g = self.last
        partial = f"{g.partial_batch_forwards} on part of the batch, " if g.partial_batch_forwards else ""
        return (
            f"{self.policy}: {g.reused_forwards}/{g.forwards} forwards reused, {partial}"
            f"{sum(g.blocks_computed) / max(1, g.forwards):.1f}/{g.blocks_total} blocks per forward, "
            f"tokens {g.token_fraction:.0%}, MACs speedup {g.macs_speedup:.2f}x, "
            f"decide {g.decide_seconds * 1e3:.1f} ms, cache {self.cache_bytes / 2**20:.1f} MiB"
        )


RECORDED_GENERATIONS = 16  # default `RecordLog.limit` (`handle.recorded_generations`)


class RecordLog:
    """The `ForwardRecord`s of the most recent `limit` generations; older ones are dropped whole and counted, so
    a long-lived handle holds a bounded number of records (stats report only generations whose every forward
    is kept). Thread-safe: concurrent generations append under one lock. A generation is dropped by its id
    (the order generations started in); the limit should exceed the number of generations running at once."""

    def __init__(self, limit: int = RECORDED_GENERATIONS) -> None:
        self._lock = threading.Lock()
        self._generations: dict[int, list[ForwardRecord]] = {}
        self._dropped_up_to = 0  # every generation id up to this one was dropped or never recorded
        self.limit = limit
        self.dropped_generations = 0
        self.dropped_forwards = 0

    def set_limit(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"recorded_generations must be a positive integer, got {limit!r}")
        with self._lock:
            self.limit = limit
            self._drop_oldest()

    def append(self, record: ForwardRecord) -> None:
        with self._lock:
            records = self._generations.get(record.generation)
            if records is None:
                if record.generation <= self._dropped_up_to:  # its generation was dropped while it ran
                    self.dropped_forwards += 1
                    return
                records = self._generations[record.generation] = []
            records.append(record)
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        while len(self._generations) > self.limit:
            oldest = min(self._generations)
            self.dropped_forwards += len(self._generations.pop(oldest))
            self.dropped_generations += 1
            self._dropped_up_to = max(self._dropped_up_to, oldest)

    def records(self) -> list[ForwardRecord]:
        """Every kept record, generation by generation (oldest first), forwards in order; a copy."""
        return [record for records in self.by_generation().values() for record in records]

    def by_generation(self) -> dict[int, list[ForwardRecord]]:
        with self._lock:
            return {g: list(self._generations[g]) for g in sorted(self._generations)}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(records) for records in self._generations.values())

    def clear(self) -> None:
        with self._lock:
            self._dropped_up_to = max([self._dropped_up_to, *self._generations])
            self._generations.clear()
            self.dropped_generations = self.dropped_forwards = 0


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors reachable from `obj` (dicts, sequences, dataclasses, plain objects): each
    distinct storage once and whole, so two views of one tensor count once, and a small view of a large tensor
    counts the large one it keeps alive."""
    storages: dict[tuple, int] = {}
    _collect_storages(obj, set(), storages)
    return sum(storages.values())


def _collect_storages(obj: Any, seen: set[int], storages: dict[tuple, int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_storages(value, seen, storages)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _collect_storages(value, seen, storages)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for value in vars(obj).values():
            _collect_storages(value, seen, storages)
