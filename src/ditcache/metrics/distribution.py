"""Distribution metrics in the shipped classifier's feature space.

- Fréchet distance (FD) between Gaussians fitted to generated and real features, the formula of FID:
  ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)). >= 0, lower is better; 0 only for equal
  statistics. With few samples it is biased upwards: compare values computed with the same sample count.
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
