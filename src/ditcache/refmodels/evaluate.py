"""Scores for a batch of reference-model samples: class accuracy, Fréchet distance, temporal consistency,
and, when a reference output is given, PSNR / SSIM against it."""

from __future__ import annotations

import functools

import torch

from ..metrics import frechet_distance, psnr, ssim, temporal_consistency
from ..metrics.classifier import class_accuracy, load_classifier, real_samples, sample_features

REAL_SAMPLES = 512


@functools.lru_cache(maxsize=4)
def _real_features(model_name: str) -> torch.Tensor:
    net = load_classifier(model_name)
    real, _ = real_samples(model_name, REAL_SAMPLES)
    feats = sample_features(net, real)
    return feats.flatten(0, 1) if feats.ndim == 3 else feats


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def score(
    model_name: str, samples: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None
) -> dict[str, float]:
    net = load_classifier(model_name)
    feats = sample_features(net, samples)
    result = {
        "accuracy": class_accuracy(net, samples, labels),
        "fd": frechet_distance(feats.flatten(0, 1) if feats.ndim == 3 else feats, _real_features(model_name)),
    }
    if samples.ndim == 5:
        result["temporal"] = temporal_consistency(feats)
    if reference is not None:
        result["psnr"] = psnr(samples, reference)
        result["ssim"] = ssim(samples, reference)
    return result
