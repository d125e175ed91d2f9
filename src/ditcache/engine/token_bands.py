"""Token bands: token-level selection in equal contiguous parts of the token sequence.

Under context parallelism (diffusers' Ulysses / ring) each rank's blocks hold one contiguous shard of every
sample's tokens, and the attention all-to-all needs the same number of tokens on every rank. So a token-level
method (TokenCache, OmniCache's token cache) selects inside *bands*: the sequence is cut into `total` equal
contiguous bands, every band keeps the same number of tokens, chosen from its own scores, and a rank holds
`total / ranks` of the bands (one by default). One process with `token_bands=N` makes exactly the choices N
ranks make: that is how the tests compare them, and how a user reproduces a context-parallel run on one device.
What must be global (TokenCache's Eq. 12 allocation over all tokens) is computed from scores gathered over the
group (`DecisionSync.gather_tokens`), the same on every rank. One band (one process, the default) is the plain
top-k over the whole sequence, bit for bit what the methods did before bands existed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from ..adapters import LatentGrid
from .decisions import DecisionSync, context_parallel_config

__all__ = [
    "ShardedLike",
    "TokenBands",
    "attention_sharded_like",
    "band_grid",
    "from_bands",
    "merge_band_index",
    "to_bands",
]


@dataclasses.dataclass(frozen=True)
class TokenBands:
    """How a rank's token stream is cut for selection: `local` bands here, `total` over the whole sequence,
    this rank's first band at `first`."""

    total: int = 1
    local: int = 1
    first: int = 0

    @classmethod
    def resolve(cls, requested: int, sync: DecisionSync) -> TokenBands:
        """The bands of a config's `token_bands` on this rank: 1 means one band per rank (one band in one
        process); more must be a multiple of the ranks sharing the tokens."""
        ranks, rank = sync.token_shards()
        total = ranks if requested == 1 else requested
        if total % ranks:
            raise ValueError(
                f"token_bands must be 1 or a multiple of the {ranks} ranks sharing the tokens, got {requested}"
            )
        local = total // ranks
        return cls(total, local, rank * local)

    def size(self, tokens: int) -> int:
        """Tokens per band of a local stream of `tokens` tokens."""
        if tokens % self.local:
            raise ValueError(f"token_bands: {self.local} bands must divide the {tokens} tokens of a block's stream")
        return tokens // self.local


def to_bands(x: torch.Tensor, bands: int) -> torch.Tensor:
    """(rows, tokens, ...) -> (rows * bands, tokens / bands, ...): each band becomes a row of its own."""
    return x.reshape(x.shape[0] * bands, x.shape[1] // bands, *x.shape[2:])


def from_bands(x: torch.Tensor, bands: int) -> torch.Tensor:
    """The inverse of `to_bands`."""
    return x.reshape(x.shape[0] // bands, x.shape[1] * bands, *x.shape[2:])


def merge_band_index(index: torch.Tensor, bands: int, size: int) -> torch.Tensor:
    """(rows * bands, k) indices inside each band of `size` tokens -> (rows, bands * k) indices into the stream,
    ascending (band b's tokens after band b - 1's)."""
    rows = index.shape[0] // bands
    offsets = torch.arange(bands, device=index.device) * size  # (bands,)
    banded = index.reshape(rows, bands, index.shape[-1]) + offsets[:, None]
    return banded.reshape(rows, bands * index.shape[-1])


def band_grid(grid: LatentGrid, tokens: int, bands: int) -> LatentGrid:
    """The token grid of one of `bands` equal contiguous parts of a stream laid out on `grid`: whole frames
    when the frames divide (video, frame-major), else rows of the image; `tokens` is the stream's length
    (`grid.num_tokens`, or height x width for a per-frame stream)."""
    if bands == 1:
        return grid
    whole = tokens == grid.num_tokens and grid.frames > 1
    if whole and grid.order == "fhw" and grid.frames % bands == 0:
        return dataclasses.replace(grid, frames=grid.frames // bands)
    if (grid.frames == 1 or not whole) and grid.height % bands == 0:
        return dataclasses.replace(grid, height=grid.height // bands)
    raise ValueError(
        f"token_bands: {bands} bands of a {grid.frames} x {grid.height} x {grid.width} token grid "
        f"({grid.order}) are not boxes of the grid; the frames (video) or the rows (image) must divide"
    )


@contextlib.contextmanager
def attention_sharded_like(model: torch.nn.Module, module: torch.nn.Module) -> Iterator[None]:
    """Run `module` (an extra block, TokenCache's predictor) with `model`'s context-parallel attention: its
    attention processors get the model's parallel config for the duration, so a copy of a block called with a
    block's shard-local arguments attends to every rank's tokens like the block does. Nothing when `model` has
    no context parallelism; the processors are restored on exit."""
    config = getattr(model, "_parallel_config", None)
    if context_parallel_config(model) is None:
        yield
        return
    processors = [
        p for p in (getattr(m, "processor", None) for m in module.modules()) if hasattr(p, "_parallel_config")
    ]
    previous = [p._parallel_config for p in processors]
    try:
        for processor in processors:
            processor._parallel_config = config
        yield
    finally:
        for processor, value in zip(processors, previous):
            processor._parallel_config = value


class ShardedLike(torch.nn.Module):
    """`module` called with `model`'s context-parallel attention (`attention_sharded_like`), as a module, so
    that the engine's MACs count (which calls it again later, `ForwardCall.count_extra_run`) does the same."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self._model = [model]  # a list: not registered as a submodule (it is the model being cached)

    def forward(self, *args: object, **kwargs: object) -> object:
        with attention_sharded_like(self._model[0], self.module):
            return self.module(*args, **kwargs)
