"""A read-only view of the cached model, handed to policies instead of the engine itself.

Policies need to know what they are caching (the model, its adapter, the hooked blocks and submodules) but
must not reach into the engine's hooks, records or per-branch states.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..adapters import LatentGrid, ModelAdapter
from .calls import BlockRef, SubmoduleRef


@dataclasses.dataclass(frozen=True)
class ModelView:
    """What a policy may read about the model it is bound to."""

    model: torch.nn.Module = dataclasses.field(repr=False)
    adapter: ModelAdapter
    blocks: tuple[BlockRef, ...]  # every hooked block, in execution order
    submodules: tuple[SubmoduleRef, ...]  # attention / MLP submodules the adapter names

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(ref.name for ref in self.blocks)

    @property
    def submodule_names(self) -> tuple[str, ...]:
        return tuple(ref.name for ref in self.submodules)

    def grid(self, arguments: dict[str, Any]) -> LatentGrid:
        """The post-patch token grid of a forward, from its bound arguments."""
        return self.adapter.grid(self.model, arguments)
