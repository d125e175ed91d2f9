"""Distribution metrics in the shipped classifier's feature space.

- Fréchet distance (FD) between Gaussians fitted to generated and real features, the formula of FID:
  ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)). >= 0, lower is better; 0 only for equal
  statistics. With few samples it is biased upwards: compare values computed with the same sample count.
- Spectral FD: the same formula on each image's (each frame's) radially averaged log power spectrum of
  its luminance, one value per frequency ring. Classifier features key on colour and texture and barely
  notice blur; this one sees lost or noisy detail (a 5-step sample scores several times the 50-step one).
- Temporal consistency (videos): mean cosine similarity of the features of consecutive frames, in
  [-1, 1], higher = smoother. Real pans of the training data score close to 1.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    a = np.asarray(features_a, dtype=np.float64).reshape(len(features_a), -1)
    b = np.asarray(features_b, dtype=np.float64).reshape(len(features_b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def temporal_consistency(frame_features: torch.Tensor) -> float:
    """`frame_features` is (B, F, D); mean cosine similarity of frames f and f+1."""
    if frame_features.ndim != 3 or frame_features.shape[1] < 2:
        raise ValueError("temporal_consistency needs (batch, frames >= 2, dim) features")
    cos = torch.nn.functional.cosine_similarity(frame_features[:, 1:], frame_features[:, :-1], dim=-1)
    return float(cos.mean())


def radial_log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, min(H, W) // 2): log power of the luminance per frequency ring.

    Rings are square (Chebyshev radius) so that a square image's rings tile its spectrum; the DC ring is
    dropped (mean brightness is not detail)."""
    if images.ndim != 4:
        raise ValueError(f"radial_log_spectrum expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    grey = images.float().mean(1)
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(grey).abs().pow(2)  # (N, H, W)
    h, w = grey.shape[-2:]
    rings = min(h, w) // 2
    fy, fx = torch.fft.fftfreq(h).abs()[:, None], torch.fft.fftfreq(w).abs()[None, :]
    index = (torch.maximum(fy, fx) * 2 * rings).round().long().clamp(max=rings)  # 0 (DC) .. rings
    total = torch.zeros(len(grey), rings + 1).index_add_(1, index.flatten(), power.flatten(1))
    count = torch.bincount(index.flatten(), minlength=rings + 1).clamp_min(1)
    return torch.log(total[:, 1:] / count[1:] + 1e-8)
