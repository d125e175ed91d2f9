"""The decision choke point: statistics of a rank's shard become one number every rank agrees on.

Under context parallelism (diffusers' `ContextParallelConfig`, Ulysses or ring; xDiT-style sequence parallel)
each rank's blocks see a shard of the tokens. A threshold on a shard-local statistic can reuse on one rank
and compute on another, and the next all-to-all then deadlocks or mixes steps. So a policy never reduces a
block's tensor to a decision itself: it hands the tensors to `DecisionSync`, which computes the local
**sums and counts** and, when a group is set, all-reduces them (SUM) over the context-parallel group before
dividing. Sums and counts rather than means of means, so uneven shards give the exact global statistic.

What needs no communication:
- counters and schedules (warm-up, every-k-th step): every rank counts the same steps;
- statistics of whole tensors: the model's output (diffusers gathers it before it leaves the model) and the
  latent the model-level hook sees (under context parallelism that hook sits outside diffusers' split, see
  `Engine.install`). Those are identical on every rank by construction.

One host sync per statistic: the local sums are stacked, reduced in one collective and read with one
`.tolist()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..numerics import rel_l1

__all__ = ["DECISION_GROUP_ATTR", "DecisionSync", "context_parallel_config", "decision_group"]

DECISION_GROUP_ATTR = "_ditcache_decision_group"  # set by `ditcache.parallel.set_decision_group`


def context_parallel_config(model: torch.nn.Module) -> object | None:
    """diffusers' `ContextParallelConfig` of a model that `enable_parallelism` (or
    `ditcache.parallel.enable_context_parallel`) prepared, else None."""
    parallel = getattr(model, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None)


def decision_group(model: torch.nn.Module) -> dist.ProcessGroup | None:
    """The group decision statistics are reduced over: one set by hand (xDiT and other sequence-parallel
    runtimes), else the ranks of diffusers' context-parallel mesh (ring x Ulysses), else None."""
    explicit = model.__dict__.get(DECISION_GROUP_ATTR)
    if explicit is not None:
        return explicit
    config = context_parallel_config(model)
    mesh = getattr(config, "_flattened_mesh", None)
    return mesh.get_group() if mesh is not None else None


class DecisionSync:
    """Reduces decision statistics over `group` (a `torch.distributed` process group), or locally when None.

    Example (a block-level policy; `call` is a `BlockCall`):

        >>> change = call.forward.decisions.rel_l1(hidden, previous_hidden)  # same value on every rank
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.reductions = 0  # collectives issued (tests count them; no timing)

    @property
    def active(self) -> bool:
        """True when statistics are reduced over more than one rank."""
        return self.group is not None and dist.get_world_size(self.group) > 1

    def totals(self, sums: Iterable[torch.Tensor]) -> list[float]:
        """Each scalar summed over the group's ranks, as Python floats (float64 accumulation)."""
        stacked = torch.stack([s.detach().reshape(()).double() for s in sums])
        if self.active:
            # gloo reduces CPU tensors, NCCL device tensors: reduce where the sums already are.
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
            self.reductions += 1
        return stacked.tolist()  # the one host sync of this statistic

    def rel_l1(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Relative L1 distance sum|a - b| / sum|b| over every rank's shard (`numerics.rel_l1` on one rank).

        Without a group this is exactly `numerics.rel_l1` (mean / mean), so single-process traces are unchanged.
        """
        if not self.active:
            return rel_l1(a, b)
        a, b = a.float(), b.to(a.device).float()
        count = torch.tensor(float(b.numel()), device=b.device)
        difference, reference, elements = self.totals([(a - b).abs().sum(), b.abs().sum(), count])
        return difference / max(reference, 1e-12 * elements)  # = mean / mean with numerics.rel_l1's clamp

    def norm(self, tensors: Iterable[torch.Tensor | None]) -> float:
        """sqrt of the sum of squares of every element of `tensors` over every rank's shard."""
        parts = [t.float().pow(2).sum() for t in tensors if t is not None]
        if not parts:
            return 0.0
        if not self.active:
            return math.sqrt(sum(float(p) for p in parts))
        (total,) = self.totals([torch.stack(parts).sum()])
        return math.sqrt(total)
