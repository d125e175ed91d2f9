"""TokenCache scheduling (paper 003, Sec. III-D) as pure functions: block-level update fractions (Eq. 12),
per-sample token top-k inside a block, and the I/P-step schedule (Eq. 13).

Conventions: `scores` are the Cache Predictor's sigmoid outputs, (rows, tokens, blocks), high = "update this
token" (alpha = 1 in Eq. 6). The global cache ratio r is the share of (block, token) updates *reused*; Eq. 12's
r_l, as printed, is the share of tokens *updated* in block l (the fraction of q = 1), which is what these
functions return as `fractions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..engine.token_bands import merge_band_index, to_bands

ISTEP_SCHEDULES = ("eq13", "uniform")


def block_keep_counts(scores: torch.Tensor, ratio: float) -> tuple[list[int], list[float]]:
    """Eq. 12: quantise the scores of all rows, tokens and blocks together, keeping the top (1 - ratio) share
    as updates; r_l = the share of block l's (row, token) entries kept. Returns (tokens to update per row in
    each block, r_l per block). The counts are shared by every row of the batch (the paper's "all samples
    within a batch share the same cache ratio"), rounded to whole tokens per row.

    >>> s = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.05]]])  # 1 row, 4 tokens, 2 blocks
    >>> block_keep_counts(s, 0.5)   # top 4 of 8 values: 0.9, 0.8, 0.7, 0.6 all in block 0
    ([4, 0], [1.0, 0.0])
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be (rows, tokens, blocks), got shape {tuple(scores.shape)}")
    rows, tokens, blocks = scores.shape
    total = rows * tokens * blocks
    keep = int(round((1.0 - ratio) * total))
    if keep >= total:
        return [tokens] * blocks, [1.0] * blocks
    if keep <= 0:
        return [0] * blocks, [0.0] * blocks
    flat = scores.float().permute(2, 0, 1).reshape(blocks, rows * tokens)  # (blocks, rows * tokens)
    # Ties are broken by position (stable sort), so equal scores give a deterministic choice.
    order = torch.sort(flat.reshape(-1), descending=True, stable=True).indices[:keep]
    kept_per_block = torch.bincount(order // (rows * tokens), minlength=blocks)
    fractions = [float(n) / (rows * tokens) for n in kept_per_block.tolist()]
    counts = [min(tokens, int(round(f * tokens))) for f in fractions]
    return counts, fractions


def uniform_keep_counts(tokens: int, blocks: int, ratio: float) -> list[int]:
    """The same number of updated tokens, round((1 - ratio) * tokens), in every block (no Eq. 12 allocation)."""
    return [min(tokens, int(round((1.0 - ratio) * tokens)))] * blocks


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) indices of the k highest-scoring tokens of each row of `scores` (rows, tokens), ascending
    (token order kept); ties broken by position.

    >>> top_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2)
    tensor([[1, 3]])
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in [0, {scores.shape[-1]}], got {k}")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def choose_tokens(scores: torch.Tensor, k: int, per_row: bool, bands: int = 1) -> torch.Tensor:
    """The tokens a block updates: per row, (rows, k) (`top_tokens`), or one set for every row, (k,), from the
    row-averaged scores (one batched subset run where per-row subsets would run row by row). With `bands` > 1,
    the k best of each of `bands` equal contiguous parts of the tokens (`engine/token_bands.py`), band after band.

    >>> choose_tokens(torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.6]]), 1, per_row=False)
    tensor([2])
    >>> choose_tokens(torch.tensor([[0.9, 0.8, 0.1, 0.2]]), 1, per_row=True, bands=2)  # best of each half
    tensor([[0, 3]])
    """
    if not per_row:
        scores = scores.float().mean(dim=0, keepdim=True)
    if bands == 1:
        index = top_tokens(scores, k)
    else:
        size = scores.shape[-1] // bands
        index = merge_band_index(top_tokens(to_bands(scores, bands), k), bands, size)
    return index if per_row else index[0]


def istep_schedule(mean_scores: Sequence[float], full_steps: int, beta: float = 0.0, mode: str = "eq13") -> list[int]:
    """The I-steps (fully computed steps) of a generation of `len(mean_scores)` steps; step 0 is always one.

    "eq13": weights w_s = exp(beta * mean_scores[s]) (the per-step mean Cache Predictor score, Eq. 13);
    I-step j (j = 0 .. full_steps - 1) is the first step whose cumulative weight *before* it reaches the
    j / full_steps percentile of the total, so every interval between I-steps holds about the same weight
    (the printed Eq. 13 does not depend on t; this is the cumulative reading, as the text describes). A
    percentile that lands on an I-step already taken moves to the next free step. "uniform": I-steps spread
    evenly, round(j * steps / full_steps). beta = 0 makes "eq13" equal to "uniform" up to rounding.

    >>> istep_schedule([0.0] * 10, 3, mode="uniform")
    [0, 3, 7]
    >>> istep_schedule([0.0, 0.0, 0.0, 0.0, 1.0, 1.0], 3, beta=math.log(4))  # w = 1,1,1,1,4,4: total 12
    [0, 4, 5]
    """
    steps = len(mean_scores)
    if steps < 1:
        raise ValueError("mean_scores must have one value per step")
    if mode not in ISTEP_SCHEDULES:
        raise ValueError(f"mode must be one of {ISTEP_SCHEDULES}, got {mode!r}")
    full_steps = max(1, min(int(full_steps), steps))
    if mode == "uniform":
        chosen = [int(round(j * steps / full_steps)) for j in range(full_steps)]
    else:
        values = [float(v) for v in mean_scores]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("mean_scores must be finite")
        top = max(beta * v for v in values)
        weights = [math.exp(beta * v - top) for v in values]  # shifted: same percentiles, no overflow
        total = sum(weights)
        before, running = [], 0.0
        for w in weights:
            before.append(running / total)
            running += w
        chosen = []
        for j in range(full_steps):
            target = j / full_steps
            chosen.append(next((s for s in range(steps) if before[s] >= target - 1e-12), steps - 1))
    return _distinct(chosen, steps)


def _distinct(steps_wanted: list[int], steps: int) -> list[int]:
    """Make the I-steps distinct: a repeated step moves to the next free step (or the previous free one at the
    end), keeping step 0 first."""
    taken: set[int] = set()
    for s in steps_wanted:
        candidate = s
        while candidate in taken and candidate < steps - 1:
            candidate += 1
        if candidate in taken:
            candidate = next(c for c in range(steps - 1, -1, -1) if c not in taken)
        taken.add(candidate)
    return sorted(taken)
