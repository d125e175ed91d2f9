"""Token indices on the latent grid, and the gather / scatter a token-subset block run needs.

A block's token stream holds `grid.num_tokens` image/video tokens per sample in the grid's order ("fhw":
frame-major, then row, then column). Index tensors are int64: `(k,)` for the same tokens in every batch row, or
`(B, k)` for per-row choices (same k in every row, so the rows still run as one batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters import LatentGrid, TokenArg


def token_coordinates(grid: LatentGrid) -> torch.Tensor:
    """(N, 3) (frame, row, column) of every token index, in the grid's token order."""
    f, h, w = torch.meshgrid(
        torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width), indexing="ij"
    )
    coords = torch.stack([f, h, w], dim=-1)  # (F, H, W, 3)
    if grid.order == "hwf":
        coords = coords.permute(1, 2, 0, 3)  # (H, W, F, 3)
    return coords.reshape(-1, 3)


def _index_of(grid: LatentGrid, mask: torch.Tensor) -> torch.Tensor:
    """Token indices (ascending) where an (F, H, W) boolean mask is set."""
    if grid.order == "hwf":
        mask = mask.permute(1, 2, 0)
    return mask.reshape(-1).nonzero().flatten()


def frame_tokens(grid: LatentGrid, frames: Sequence[int]) -> torch.Tensor:
    """Indices of every token of the given frames, ascending."""
    for frame in frames:
        if not 0 <= frame < grid.frames:
            raise ValueError(f"frames must lie in [0, {grid.frames}), got {frame}")
    mask = torch.zeros(grid.frames, grid.height, grid.width, dtype=torch.bool)
    mask[list(frames)] = True
    return _index_of(grid, mask)


def window_tokens(grid: LatentGrid, rows: range, columns: range, frames: range | None = None) -> torch.Tensor:
    """Indices of the tokens in a spatial window (rows x columns) of the given frames (default: all), ascending."""
    frames = range(grid.frames) if frames is None else frames
    spans = (("rows", rows, grid.height), ("columns", columns, grid.width), ("frames", frames, grid.frames))
    for name, span, size in spans:
        if not isinstance(span, range) or span.step != 1 or span.start < 0 or span.stop > size:
            raise ValueError(f"{name} must be a contiguous range inside [0, {size}), got {span!r}")
    mask = torch.zeros(grid.frames, grid.height, grid.width, dtype=torch.bool)
    mask[frames.start : frames.stop, rows.start : rows.stop, columns.start : columns.stop] = True
    return _index_of(grid, mask)


def patch_groups(grid: LatentGrid, k: int) -> torch.Tensor:
    """(G, k * k) token indices of the non-overlapping k x k spatial patches of every frame, patches in
    (frame, patch row, patch column) order and tokens inside a patch row-major. k must divide height and width."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or grid.height % k or grid.width % k:
        raise ValueError(
            f"k must be a positive integer dividing the grid's height {grid.height} and width {grid.width}, got {k!r}"
        )
    index = torch.empty(grid.frames, grid.height, grid.width, dtype=torch.long)
    coords = token_coordinates(grid)
    index[coords[:, 0], coords[:, 1], coords[:, 2]] = torch.arange(grid.num_tokens)
    patches = index.view(grid.frames, grid.height // k, k, grid.width // k, k).permute(0, 1, 3, 2, 4)
    return patches.reshape(-1, k * k)


def check_index(index: torch.Tensor, batch: int, num_tokens: int) -> None:
    """A clear error for an index that `run_tokens` cannot use (one host sync for the range check)."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long:
        raise ValueError(
            f"index must be an int64 tensor of token indices, got {type(index).__name__} {getattr(index, 'dtype', '')}"
        )
    if index.ndim not in (1, 2) or (index.ndim == 2 and index.shape[0] != batch):
        raise ValueError(f"index must have shape (k,) or (batch={batch}, k), got {tuple(index.shape)}")
    if index.shape[-1] > num_tokens:
        raise ValueError(f"index selects {index.shape[-1]} tokens but the block has {num_tokens}")
    if index.numel() and not bool(((index >= 0) & (index < num_tokens)).all()):
        raise ValueError(f"index values must lie in [0, {num_tokens})")


def is_identity(index: torch.Tensor, num_tokens: int) -> bool:
    """Every row selects all tokens in order (the block can simply run)."""
    if index.shape[-1] != num_tokens:
        return False
    return bool((index == torch.arange(num_tokens, device=index.device)).all())


def gather_tokens(value: torch.Tensor, index: torch.Tensor, dim: int, batch_mode: str, offset: int) -> torch.Tensor:
    """`value` restricted to the kept tokens along `dim`; the first `offset` entries (text) are always kept.

    Per-row indices need a batch axis: "broadcast" values are expanded to the batch first; "shared" values
    (no batch axis) only take a shared 1-D index (the caller runs rows with different indices separately).
    """
    if index.ndim == 1:
        keep = torch.cat([torch.arange(offset, device=index.device), index.to(value.device) + offset])
        return value.index_select(dim, keep)
    if batch_mode == "shared":
        raise ValueError("a per-row index cannot gather an argument without a batch axis")
    rows = index.shape[0]
    if batch_mode == "broadcast":
        value = value.expand(rows, *value.shape[1:])
    prefix = torch.arange(offset, device=index.device).expand(rows, offset)
    keep = torch.cat([prefix, index + offset], dim=1).to(value.device)  # (B, offset + k)
    shape = [rows] + [1] * (value.ndim - 1)
    shape[dim] = keep.shape[1]
    expanded = keep.view(shape).expand(*[keep.shape[1] if d == dim else s for d, s in enumerate(value.shape)])
    return value.gather(dim, expanded)


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """A copy of `base` (B, N, C) with the tokens at `index` replaced by `fresh` (B, k, C)."""
    out = base.clone()
    if index.ndim == 1:
        return out.index_copy_(1, index.to(base.device), fresh.to(base.dtype))
    return out.scatter_(1, index.to(base.device).unsqueeze(-1).expand(-1, -1, base.shape[-1]), fresh.to(base.dtype))


def token_arg_applies(arg: TokenArg, value: object) -> bool:
    tensors = value if isinstance(value, (tuple, list)) else (value,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    return arg.ndim is None or all(t.ndim == arg.ndim for t in tensors)
