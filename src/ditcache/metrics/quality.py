"""Fidelity to a reference output: PSNR and SSIM (scikit-image's implementations).

Inputs are tensors in [-1, 1]: (B, 3, H, W) images or (B, 3, F, H, W) videos (scored frame by frame).
- PSNR in dB, higher is better; identical inputs give +inf (reported as `inf`). Caching papers call
  > 30 dB visually identical on real models; on 32x32 images a few dB matter more.
- SSIM in [-1, 1], 1 = identical structure.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _frames(x: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) float64 in [0, 1]."""
    x = x.detach().float().clamp(-1, 1)
    if x.ndim == 5:  # (B, C, F, H, W) -> (B*F, C, H, W)
        x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    return ((x + 1) / 2).permute(0, 2, 3, 1).double().numpy()


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) over samples (and frames)."""
    a, b = _frames(output), _frames(reference)
    if a.shape != b.shape:
        raise ValueError(f"output shape {tuple(output.shape)} != reference shape {tuple(reference.shape)}")
    values = []
    for x, y in zip(a, b):
        values.append(float("inf") if np.array_equal(x, y) else peak_signal_noise_ratio(y, x, data_range=1.0))
    return float(np.mean(values))


def ssim(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over samples (and frames), 7x7 Gaussian-free windows as in scikit-image's default."""
    a, b = _frames(output), _frames(reference)
    if a.shape != b.shape:
        raise ValueError(f"output shape {tuple(output.shape)} != reference shape {tuple(reference.shape)}")
    win = min(7, a.shape[1], a.shape[2])
    win -= 1 - win % 2  # odd
    return float(
        np.mean([structural_similarity(y, x, data_range=1.0, channel_axis=-1, win_size=win) for x, y in zip(a, b)])
    )
