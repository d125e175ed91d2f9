"""Metric functions on inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from ditcache.metrics import frechet_distance, psnr, radial_log_spectrum, ssim, temporal_consistency


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


def test_radial_log_spectrum_on_known_images():
    # A checkerboard has all its power at the Nyquist ring (the last one); a constant image has none.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0
    spectra = radial_log_spectrum(torch.stack([checker.expand(3, 16, 16), torch.full((3, 16, 16), 0.3)]))
    assert spectra.shape == (2, 8)
    assert int(spectra[0].argmax()) == 7 and spectra[0, 7] > spectra[0, :7].max() + 20
    assert torch.allclose(spectra[1], torch.full((8,), math.log(1e-8)))
    # Blurring white noise lowers the high-frequency rings, not the lowest one.
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    sharp, soft = radial_log_spectrum(noise).mean(0), radial_log_spectrum(blurred).mean(0)
    assert (sharp[-4:] - soft[-4:]).min() > 2.0 and abs(float(sharp[0] - soft[0])) < 1.0
    with pytest.raises(ValueError, match="N, C, H, W"):
        radial_log_spectrum(noise[0])
