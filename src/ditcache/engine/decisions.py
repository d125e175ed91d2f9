"""The decision choke point: statistics of a rank's shard become one number every rank agrees on.

Under context parallelism (diffusers' `ContextParallelConfig`, Ulysses or ring; xDiT-style sequence parallel)
each rank's blocks see a shard of the tokens. A threshold on a shard-local statistic can reuse on one rank
and compute on another, and the next all-to-all then deadlocks or mixes steps. So a policy never reduces a
block's tensor to a decision itself: it hands the tensors to `DecisionSync`, which computes the local
**sums and counts** and, when a group is set, all-reduces them (SUM) over the context-parallel group before
dividing. Sums and counts rather than means of means, so uneven shards give the exact global statistic.

What is a shard depends on how the work is split (`Sharding`):
- TOKENS (context / sequence parallelism): a block's tensors are shards; the model's output (diffusers gathers
  it before it leaves the model) and the latent the model-level hook sees (that hook sits outside diffusers'
  split, see `Engine.install`) are whole and identical on every rank, so their statistics (`model_level=True`)
  are not reduced.
- ROWS (data parallelism, `ditcache.parallel.data`): every tensor holds this rank's rows of the batch, so every
  statistic is reduced, and each rank takes the decision one process would take for the whole batch.
Counters and schedules (warm-up, every-k-th step) need no communication: every rank counts the same steps.

One host sync per statistic: the local sums are stacked, reduced in one collective and read with one
`.tolist()`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..numerics import rel_l1

__all__ = [
    "DECISION_GROUP_ATTR",
    "DecisionGroup",
    "DecisionSync",
    "Sharding",
    "context_parallel_config",
    "decision_group",
]

DECISION_GROUP_ATTR = "_ditcache_decision_group"  # set by `ditcache.parallel.set_decision_group`


class Sharding(enum.Enum):
    """What each rank holds a part of."""

    TOKENS = "tokens"  # context / sequence parallelism: blocks see a shard of each sample's tokens
    ROWS = "rows"  # data parallelism: every tensor is this rank's rows of the batch


@dataclasses.dataclass(frozen=True)
class DecisionGroup:
    """The ranks a model's decision statistics are reduced over, and how the work is split between them."""

    group: dist.ProcessGroup
    sharding: Sharding = Sharding.TOKENS


def context_parallel_config(model: torch.nn.Module) -> object | None:
    """diffusers' `ContextParallelConfig` of a model that `enable_parallelism` (or
    `ditcache.parallel.enable_context_parallel`) prepared, else None."""
    parallel = getattr(model, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None)


def decision_group(model: torch.nn.Module) -> DecisionGroup | None:
    """The group decision statistics are reduced over: one set by hand (`set_decision_group`: data
    parallelism, xDiT and other sequence-parallel runtimes), else the ranks of diffusers' context-parallel mesh
    (ring x Ulysses, TOKENS), else None."""
    explicit = model.__dict__.get(DECISION_GROUP_ATTR)
    if explicit is not None:
        return explicit
    mesh = getattr(context_parallel_config(model), "_flattened_mesh", None)
    return DecisionGroup(mesh.get_group(), Sharding.TOKENS) if mesh is not None else None


class DecisionSync:
    """Reduces decision statistics over a `DecisionGroup`, or computes them locally when there is none.

    Example (a block-level policy; `call` is a `BlockCall`):

        >>> change = call.forward.decisions.rel_l1(hidden, previous_hidden)  # same value on every rank
    """

    def __init__(self, group: DecisionGroup | None = None) -> None:
        self.group = group
        self.reductions = 0  # collectives issued (tests count them; no timing)

    @property
    def active(self) -> bool:
        """True when statistics are reduced over more than one rank."""
        return self.group is not None and dist.get_world_size(self.group.group) > 1

    def reduces(self, model_level: bool) -> bool:
        """Whether a statistic is reduced: block tensors always under a group; whole-model tensors (the model's
        output, its input latent, a trial forward's output) only when ranks hold different rows."""
        return self.active and (not model_level or self.group.sharding is Sharding.ROWS)

    def totals(self, sums: Iterable[torch.Tensor], model_level: bool = False) -> list[float]:
        """Each scalar summed over the group's ranks (when `reduces(model_level)`), as Python floats (float64)."""
        stacked = torch.stack([s.detach().reshape(()).double() for s in sums])
        if self.reduces(model_level):
            # gloo reduces CPU tensors, NCCL device tensors: reduce where the sums already are.
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group.group)
            self.reductions += 1
        return stacked.tolist()  # the one host sync of this statistic

    def rel_l1(self, a: torch.Tensor, b: torch.Tensor, model_level: bool = False) -> float:
        """Relative L1 distance sum|a - b| / sum|b| over every rank's part; exactly `numerics.rel_l1` (mean /
        mean) when nothing is reduced, so single-process traces are unchanged."""
        if not self.reduces(model_level):
            return rel_l1(a, b)
        a, b = a.float(), b.to(a.device).float()
        count = torch.tensor(float(b.numel()), device=b.device)
        difference, reference, elements = self.totals([(a - b).abs().sum(), b.abs().sum(), count], model_level)
        return difference / max(reference, 1e-12 * elements)  # = mean / mean with numerics.rel_l1's clamp

    def norm(self, tensors: Iterable[torch.Tensor | None], model_level: bool = False) -> float:
        """sqrt of the sum of squares of every element of `tensors` over every rank's part."""
        parts = [(t.abs() if t.is_complex() else t.float()).pow(2).sum() for t in tensors if t is not None]
        if not self.reduces(model_level):
            return math.sqrt(sum(float(p) for p in parts))
        (total,) = self.totals([torch.stack(parts).sum() if parts else torch.zeros(())], model_level)
        return math.sqrt(total)

    def vector_norm(self, t: torch.Tensor, model_level: bool = False) -> float:
        """The 2-norm of `t` (real or complex) over every rank's part; exactly `torch.linalg.vector_norm`
        when nothing is reduced."""
        if not self.reduces(model_level):
            return float(torch.linalg.vector_norm(t))
        return self.norm([t], model_level)

    def token_shards(self) -> tuple[int, int]:
        """(ranks sharing each sample's tokens, this rank's place among them): the group under TOKENS sharding,
        else (1, 0). Token-level methods select inside one band per shard (`engine/token_bands.py`)."""
        if not self.active or self.group.sharding is not Sharding.TOKENS:
            return 1, 0
        return dist.get_world_size(self.group.group), dist.get_rank(self.group.group)

    def gather_tokens(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`t`, a per-token tensor of this rank's shard, concatenated along `dim` over the ranks sharing the
        tokens, in shard order (the whole sequence, identical on every rank); `t` itself without such ranks."""
        ranks, _ = self.token_shards()
        if ranks == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(ranks)]
        dist.all_gather(parts, t.contiguous(), group=self.group.group)
        self.reductions += 1
        return torch.cat(parts, dim=dim)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, a per-row tensor of this rank's rows, concatenated along dim 0 over the ranks holding the
        batch's rows (ROWS sharding; shards may differ in size), in rank order: the whole batch, identical on
        every rank; `t` itself otherwise."""
        if not self.active or self.group.sharding is not Sharding.ROWS:
            return t
        group = self.group.group
        ranks = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(ranks)]
        dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device), group=group)
        counts = [int(size) for size in sizes]  # one host sync
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded, group=group)
        self.reductions += 2
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def gather_whole(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row, per-token tensor (rows, tokens, ...) of this rank's part, made whole over the group: its
        tokens under TOKENS sharding, its rows under ROWS, itself in one process."""
        return self.gather_rows(self.gather_tokens(t))
