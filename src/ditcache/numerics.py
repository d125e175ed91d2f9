"""Small numeric helpers shared by policies, calibration and analysis (a leaf module: torch and stdlib only).

- `rel_l1`: relative L1 distance, mean |a - b| / mean |b|;
- FFT frequency helpers over the last two (H, W) dimensions of a (B, C, F, H, W) tensor: the centred
  spectrum, a disc mask around its centre, the masked low-frequency spectrum, and a low / high split in
  the signal domain.
"""

from __future__ import annotations

import torch

__all__ = ["centred_spectrum", "frequency_masks", "frequency_split", "low_frequency", "rel_l1"]


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b| (denominator clamped at 1e-12), in float32 on `a`'s device: a decision statistic
    of a half-precision model or of a cache kept elsewhere (`cache_dtype` / `cache_device`)."""
    a, b = a.float(), b.to(a.device).float()
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def frequency_masks(h: int, w: int, radius: float, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (H, W) disc of `radius` x min(H, W) around the centre of a shifted 2-D spectrum."""
    rows = torch.arange(h, device=device).view(-1, 1) - h // 2
    cols = torch.arange(w, device=device).view(1, -1) - w // 2
    return (rows**2 + cols**2).float().sqrt() <= radius * min(h, w)


def centred_spectrum(x5: torch.Tensor) -> torch.Tensor:
    """2-D FFT over H, W of a (B, C, F, H, W) tensor (in float32 or wider), zero frequency at the centre."""
    return torch.fft.fftshift(torch.fft.fft2(x5.float(), dim=(-2, -1)), dim=(-2, -1))


def low_frequency(x5: torch.Tensor, radius: float) -> torch.Tensor:
    """Centred 2-D spectrum of (B, C, F, H, W) masked to a disc of `radius` x min(H, W)."""
    return centred_spectrum(x5) * frequency_masks(x5.shape[-2], x5.shape[-1], radius, x5.device)


def frequency_split(x5: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-pass, high-pass) parts of a real (B, C, F, H, W) tensor over H, W; they sum to `x5`."""
    masked = low_frequency(x5, radius)
    low = torch.fft.ifft2(torch.fft.ifftshift(masked, dim=(-2, -1)), dim=(-2, -1)).real.to(x5.dtype)
    return low, x5 - low
