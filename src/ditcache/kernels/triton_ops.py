"""Triton kernels for the token-cache ops (OmniCache's GPU gather / scatter / merge), CUDA tensors only.

One program per (row, selected element, feature block): it reads the element's index once and moves a
`BLOCK` slice of features with coalesced loads and stores. The merge accumulates sources into their destination
with atomic adds in float32 (the summation order, hence the last bits, may differ from the torch reference).
Imported only when `ditcache.kernels` selects the Triton backend (CUDA tensor, triton installed). Not run on a
GPU in this repository's development sessions: the torch path (`torch_ops`) is the tested reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _gather_kernel(x_ptr, index_ptr, out_ptr, n, k, c, BLOCK: tl.constexpr):
    row_item = tl.program_id(0)  # row * k + j
    block = tl.program_id(1)
    row = row_item // k
    element = tl.load(index_ptr + row_item)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < c
    values = tl.load(x_ptr + (row * n + element) * c + offsets, mask=mask)
    tl.store(out_ptr + row_item * c + offsets, values, mask=mask)


@triton.jit
def _scatter_kernel(out_ptr, index_ptr, fresh_ptr, n, k, c, BLOCK: tl.constexpr):
    row_item = tl.program_id(0)
    block = tl.program_id(1)
    row = row_item // k
    element = tl.load(index_ptr + row_item)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < c
    values = tl.load(fresh_ptr + row_item * c + offsets, mask=mask)
    tl.store(out_ptr + (row * n + element) * c + offsets, values, mask=mask)


@triton.jit
def _merge_kernel(x_ptr, src_ptr, dst_ptr, total_ptr, count_ptr, n, r, c, BLOCK: tl.constexpr):
    row_item = tl.program_id(0)  # row * r + j
    block = tl.program_id(1)
    row = row_item // r
    source = tl.load(src_ptr + row_item)
    target = tl.load(dst_ptr + row_item)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < c
    values = tl.load(x_ptr + (row * n + source) * c + offsets, mask=mask).to(tl.float32)
    tl.atomic_add(total_ptr + (row * n + target) * c + offsets, values, mask=mask)
    if block == 0:
        tl.atomic_add(count_ptr + row * n + target, 1.0)


def _grid(items: int, channels: int) -> tuple[int, int]:
    return (items, triton.cdiv(channels, BLOCK))


def gather_rows_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x, index = x.contiguous(), index.to(device=x.device, dtype=torch.int64).contiguous()
    rows, n, c = x.shape
    k = index.shape[1]
    out = torch.empty(rows, k, c, device=x.device, dtype=x.dtype)
    if out.numel():
        _gather_kernel[_grid(rows * k, c)](x, index, out, n, k, c, BLOCK=BLOCK)
    return out


def scatter_rows_tokens(base: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    out = base.contiguous().clone()
    index = index.to(device=base.device, dtype=torch.int64).contiguous()
    fresh = fresh.to(base.dtype).contiguous()
    rows, n, c = out.shape
    k = index.shape[1]
    if rows * k * c:
        _scatter_kernel[_grid(rows * k, c)](out, index, fresh, n, k, c, BLOCK=BLOCK)
    return out


def merge_mean(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    src = src.to(device=x.device, dtype=torch.int64).contiguous()
    dst = dst.to(device=x.device, dtype=torch.int64).contiguous()
    rows, n, c = x.shape
    r = src.shape[1]
    total = x.float().contiguous().clone()
    count = torch.ones(rows, n, device=x.device, dtype=torch.float32)
    if rows * r * c:
        _merge_kernel[_grid(rows * r, c)](x, src, dst, total, count, n, r, c, BLOCK=BLOCK)
    return (total / count.unsqueeze(-1)).to(x.dtype)
