"""Multiply-accumulate counts per forward and per block, measured with `torch.utils.flop_counter`.

The counts depend only on shapes, so they are measured once per input signature (lazily, when stats are
asked for, so timed runs are not slowed) on an uncached forward, and then combined with the record of
which blocks each forward actually ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any, **kwargs: Any) -> int:
    # (B, H, Lq, D) x (B, H, Lk, D): QK^T and PV, 2 flops per MAC each.
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * lq * lk * d + 2 * b * lq * lk * dv


def _custom_mapping() -> dict:
    # The CPU flash kernel has no formula in torch's registry; without this attention would count 0.
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_flops
    return mapping


@dataclasses.dataclass(frozen=True)
class CostTable:
    total: int  # MACs of one full forward
    blocks: tuple[int, ...]  # MACs of each hooked block, in engine order
    submodules: dict[str, int] = dataclasses.field(default_factory=dict)  # "blocks.0.attn1" -> MACs

    @property
    def outside_blocks(self) -> int:
        return self.total - sum(self.blocks)


def measure_costs(
    run: Callable[[], Any], model: torch.nn.Module, block_names: Sequence[str], submodule_names: Sequence[str] = ()
) -> CostTable:
    """Run `run()` (one uncached forward) under a flop counter and split the count per block/submodule."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        run()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    total = counts.get("Global", 0) // 2
    blocks = tuple(counts.get(f"{root}.{name}", 0) // 2 for name in block_names)
    submodules = {name: counts.get(f"{root}.{name}", 0) // 2 for name in submodule_names}
    return CostTable(total=total, blocks=blocks, submodules=submodules)
