"""Gather / scatter / merge kernels for token caching, with automatic backend selection.

Each op has a torch implementation (`torch_ops`, the reference and the CPU path) and a Triton one
(`triton_ops`, OmniCache's GPU kernels) used automatically for CUDA tensors when the optional `triton` package is
installed (`pip install ditcache[triton]`). `DITCACHE_KERNELS=torch` forces the torch path everywhere (e.g. to
compare). The Triton kernels were written without access to a GPU in this repository's development sessions:
see docs/ENGINE.md ("Kernels") for what has and has not been run.

Ops (B rows, N elements, C features; per-row int64 indices, same count per row):
- `gather_rows_tokens(x (B, N, C), index (B, k)) -> (B, k, C)`;
- `scatter_rows_tokens(base (B, N, C), index (B, k), fresh (B, k, C)) -> (B, N, C)`: a copy of `base`;
- `merge_mean(x (B, N, C), src (B, r), dst (B, r)) -> (B, N, C)`: every destination replaced by the mean of
  itself and the sources matched to it (ToMe's merge), the other elements unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import torch_ops

BACKENDS = ("torch", "triton")
BACKEND_ENV = "DITCACHE_KERNELS"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(device_type: str, has_triton: bool, forced: str | None) -> str:
    """ "triton" for CUDA tensors when Triton is installed and not forced off, else "torch"."""
    if forced not in (None, "", *BACKENDS):
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS} (or unset), got {forced!r}")
    if forced == "torch":
        return "torch"
    if device_type == "cuda" and has_triton:
        return "triton"
    if forced == "triton":
        raise RuntimeError(f"{BACKEND_ENV}=triton needs CUDA tensors and the triton package")
    return "torch"


def backend(tensor: torch.Tensor) -> str:
    """The backend the ops use for `tensor`."""
    return select_backend(tensor.device.type, triton_available(), os.environ.get(BACKEND_ENV))


def _ops(tensor: torch.Tensor):  # noqa: ANN202 - a module
    if backend(tensor) == "triton":
        from . import triton_ops

        return triton_ops
    return torch_ops


def gather_rows_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _ops(x).gather_rows_tokens(x, index)


def scatter_rows_tokens(base: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    return _ops(base).scatter_rows_tokens(base, index, fresh)


def merge_mean(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return _ops(x).merge_mean(x, src, dst)


__all__ = ["backend", "gather_rows_tokens", "merge_mean", "scatter_rows_tokens", "select_backend"]
