"""Metric functions on inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from ditcache.metrics import frechet_distance, psnr, ssim, temporal_consistency


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x, x) == math.inf
    # [-1, 1] maps to [0, 1]: an offset of 0.2 is 0.1 in [0, 1] -> MSE 0.01 -> 20 dB.
    assert psnr(x + 0.2, x) == pytest.approx(20.0, abs=1e-4)  # float32 inputs


def test_psnr_and_ssim_on_videos_score_every_frame():
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    noisy = video.clone()
    noisy[:, :, 2] += 0.3 * torch.randn_like(noisy[:, :, 2])
    assert ssim(video, video) == pytest.approx(1.0)
    assert 0.0 < ssim(noisy, video) < 1.0
    assert psnr(noisy, video) == math.inf or psnr(noisy, video) > 0
    with pytest.raises(ValueError, match="shape"):
        psnr(video, video[:, :, :2])


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, mean shifted by (2, 0, 0): FD = 4 (up to sampling error).
    assert frechet_distance(a + np.array([2.0, 0, 0]), a) == pytest.approx(4.0, abs=1e-6)
    # Isotropic scale 2 vs 1 in 3-D: Tr(4I + I - 2*2I) = 3.
    b = rng.normal(size=(20000, 3))
    assert frechet_distance(2 * b, b) == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_temporal_consistency():
    static = torch.ones(2, 5, 8)
    assert temporal_consistency(static) == pytest.approx(1.0)
    flipping = torch.ones(1, 4, 8)
    flipping[:, 1::2] *= -1
    assert temporal_consistency(flipping) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        temporal_consistency(torch.ones(2, 1, 8))
