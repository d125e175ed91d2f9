"""OmniCache (hierarchical) matching: bipartite source / destination split, cosine matching, top-r selection.

Elements (tokens of a frame, frames of a video, patch positions) sit on a small 3-D grid (a, h, w). Windows
(2x2 spatial windows for tokens and positions, pairs of adjacent frames for frames) each get one random
destination; every other element is a source. Each source is matched to its most similar destination
(cosine similarity) inside its *group* (hierarchical patches: k x k groups per frame; k = 1 is one group,
flat matching), and the r sources with the highest similarity are selected (ToMeSD's bipartite soft matching,
with the merge replaced by skip-and-refill in the policy). Everything is batched over samples: each sample
(row of `features`) gets its own matches, and rows never influence each other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import torch

from ..adapters import LatentGrid
from ..kernels import merge_mean, scatter_rows_tokens

if TYPE_CHECKING:
    from .omnicache_hierarchical import OmniCacheHierarchicalConfig


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where elements sit: `coords` (E, 3) (a, h, w) per element in the features' order, the grid `shape`
    (A, H, W), window and group sizes per axis (a group is a box of the grid; windows are clipped to it)."""

    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    group: tuple[int, int, int]
    order: str = "ahw"  # "ahw": a slowest then h then w (fhw token order); "hwa": a fastest

    def __post_init__(self) -> None:
        for axis, (size, group) in enumerate(zip(self.shape, self.group)):
            if group < 1 or size % group:
                raise ValueError(
                    f"groups must divide the grid: axis {axis} has {size} elements, group size {group} "
                    f"(use a `groups` value that divides the token grid's height and width)"
                )

    @property
    def num_elements(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]


@dataclasses.dataclass(frozen=True)
class Structure:
    """The static part of a layout: group and window id per element (ids of windows are global)."""

    group_id: torch.Tensor  # (E,)
    window_id: torch.Tensor  # (E,)
    num_groups: int


@functools.lru_cache(maxsize=64)
def structure(geometry: Geometry) -> Structure:
    a, h, w = (torch.arange(n) for n in geometry.shape)
    grid = torch.stack(torch.meshgrid(a, h, w, indexing="ij"), dim=-1)  # (A, H, W, 3)
    if geometry.order == "hwa":
        grid = grid.permute(1, 2, 0, 3)
    coords = grid.reshape(-1, 3)
    group_size = torch.tensor(geometry.group)
    groups_per_axis = torch.tensor(geometry.shape) // group_size
    group_coord = coords // group_size
    group_id = (group_coord[:, 0] * groups_per_axis[1] + group_coord[:, 1]) * groups_per_axis[2] + group_coord[:, 2]
    local = coords % group_size
    window_size = torch.tensor(geometry.window)
    windows_per_axis = (group_size + window_size - 1) // window_size
    window_coord = local // window_size
    local_window = (window_coord[:, 0] * windows_per_axis[1] + window_coord[:, 1]) * windows_per_axis[2] + window_coord[
        :, 2
    ]
    window_id = group_id * int(windows_per_axis.prod()) + local_window
    return Structure(group_id, window_id, int(groups_per_axis.prod()))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sources and destinations per group: `src` (G, S) and `dst` (G, D) element indices."""

    src: torch.Tensor
    dst: torch.Tensor

    @property
    def num_sources(self) -> int:
        return self.src.numel()


def layout(geometry: Geometry, generator: torch.Generator | None) -> Layout:
    """One random destination per window (the first element of each window when `generator` is None)."""
    info = structure(geometry)
    count = geometry.num_elements
    if generator is None:
        keys = torch.arange(count, dtype=torch.float64) / count
    else:
        keys = torch.rand(count, generator=generator, dtype=torch.float64)
    order = torch.argsort(info.window_id.double() * 2 + keys)  # by window, random inside the window
    first = torch.ones(count, dtype=torch.bool)
    first[1:] = info.window_id[order][1:] != info.window_id[order][:-1]
    is_dst = torch.zeros(count, dtype=torch.bool)
    is_dst[order[first]] = True
    element = torch.arange(count)
    by_group = torch.argsort(info.group_id * count + element)  # group-major, ascending inside a group
    dst = by_group[is_dst[by_group]].view(info.num_groups, -1)
    src = by_group[~is_dst[by_group]].view(info.num_groups, -1)
    return Layout(src=src, dst=dst)


@dataclasses.dataclass(frozen=True)
class Match:
    """The r selected sources per row and the destination each one matched: both (B, r) element indices."""

    src: torch.Tensor
    dst: torch.Tensor

    def kept(self, num_elements: int) -> torch.Tensor:
        """(B, E - r) the other elements of each row, ascending."""
        rows = self.src.shape[0]
        mask = torch.ones(rows, num_elements, dtype=torch.bool, device=self.src.device)
        mask.scatter_(1, self.src, False)
        return mask.nonzero()[:, 1].view(rows, num_elements - self.src.shape[1])


def bipartite_match(features: torch.Tensor, plan: Layout, r: int) -> Match:
    """Match every source of `features` (B, E, D) to its most similar destination of the same group (cosine
    similarity) and select the `r` sources with the highest similarity (ties: the lower source index first)."""
    rows = features.shape[0]
    r = min(r, plan.num_sources)
    device = features.device
    src_index, dst_index = plan.src.to(device), plan.dst.to(device)
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    src = x[:, src_index]  # (B, G, S, D)
    dst = x[:, dst_index]  # (B, G, Dn, D)
    best, choice = (src @ dst.transpose(-1, -2)).max(dim=-1)  # (B, G, S)
    best = best.flatten(1)
    matched_dst = _matched(dst_index, choice)
    order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]  # (B, r) into flat sources
    flat_src = src_index.flatten().expand(rows, -1)
    return Match(src=flat_src.gather(1, order), dst=matched_dst.gather(1, order))


def _matched(dst_index: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """(B, G * S): the destination element each source chose (`choice` indexes its group's destinations)."""
    rows, groups, sources = choice.shape
    table = dst_index.unsqueeze(0).expand(rows, -1, -1)  # (B, G, Dn)
    return table.gather(2, choice).reshape(rows, groups * sources)


def matching_macs(plan: Layout, rows: int, dim: int) -> int:
    """Multiply-accumulates of the similarity products of one `bipartite_match`: rows x groups x sources per
    group x destinations per group x feature size (k x k groups divide it by about k^2)."""
    groups, sources = plan.src.shape
    return rows * groups * sources * plan.dst.shape[1] * dim


def merge_inputs(features: torch.Tensor, match: Match) -> torch.Tensor:
    """ToMe-style merge: every destination becomes the mean of itself and the sources matched to it."""
    return merge_mean(features, match.src, match.dst)


def copy_to_sources(output: torch.Tensor, match: Match) -> torch.Tensor:
    """ToMe-style unmerge: each merged source takes its destination's output."""
    fresh = output.gather(1, match.dst.unsqueeze(-1).expand(-1, -1, output.shape[-1]))
    return scatter_rows_tokens(output, match.src, fresh)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What one block call skips: rows (frames / positions: `row_geometry` over `samples` groups of rows) and
    tokens inside the computed rows (`token_geometry`), with the counts r per sample / per row."""

    samples: int
    row_geometry: Geometry | None
    row_r: int
    token_geometry: Geometry | None
    token_r: int


def plan_block(
    kind: str, rows: int, tokens: int, grid: LatentGrid, config: OmniCacheHierarchicalConfig
) -> BlockPlan | None:
    """The caches a block of `kind` with a (rows, tokens) stream applies on `grid`; None when none applies."""
    f, h, w, k = grid.frames, grid.height, grid.width, config.groups
    if h % k or w % k:
        raise ValueError(f"groups={k} must divide the token grid's height {h} and width {w}")
    token_group = (1, h // k, w // k)

    def count(ratio: float, elements: int) -> int:
        return int(ratio * elements + 0.5)

    if kind == "temporal":
        if tokens != f or rows % (h * w) or not config.block_ratio:
            return None
        geometry = Geometry((1, h, w), (1, 2, 2), token_group)
        return BlockPlan(rows // (h * w), geometry, count(config.block_ratio, h * w), None, 0)
    if kind == "spatial" and tokens == h * w:
        frames = f if f > 1 and rows % f == 0 else 1
        row_geometry = Geometry((frames, 1, 1), (2, 1, 1), (frames, 1, 1)) if frames > 1 else None
        row_r = count(config.frame_ratio, frames) if row_geometry else 0
        token_geometry = Geometry((1, h, w), (1, 2, 2), token_group)
        token_r = count(config.token_ratio, tokens)
    elif kind in ("joint", "spatiotemporal", "spatial") and tokens == f * h * w:
        order = "ahw" if grid.order == "fhw" else "hwa"
        token_geometry = Geometry((f, h, w), (1, 2, 2), token_group, order)
        row_geometry, row_r, frames = None, 0, 1
        token_r = count(config.token_ratio, tokens)
    else:
        return None
    if not row_r and not token_r:
        return None
    return BlockPlan(rows // frames, row_geometry, row_r, token_geometry if token_r else None, token_r)
