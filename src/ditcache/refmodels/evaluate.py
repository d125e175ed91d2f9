"""Scores for a batch of reference-model samples: class accuracy, Fréchet distances (classifier features and
log spectra), temporal consistency, and, when a reference output is given, PSNR / SSIM against it."""

from __future__ import annotations

import functools

import torch

from ..metrics import frechet_distance, psnr, radial_log_spectrum, ssim, temporal_consistency
from ..metrics.classifier import as_frames, class_accuracy, load_classifier, real_samples, sample_features

REAL_SAMPLES = 512


@functools.lru_cache(maxsize=4)
def _real_features(model_name: str) -> torch.Tensor:
    net = load_classifier(model_name)
    real, _ = real_samples(model_name, REAL_SAMPLES)
    feats = sample_features(net, real)
    return feats.flatten(0, 1) if feats.ndim == 3 else feats


@functools.lru_cache(maxsize=4)
def _real_spectra(model_name: str) -> torch.Tensor:
    real, _ = real_samples(model_name, REAL_SAMPLES)
    return _spectra(real)


def _spectra(samples: torch.Tensor) -> torch.Tensor:
    return radial_log_spectrum(as_frames(samples)[0].clamp(-1, 1))  # videos: one spectrum per frame


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
        "fd_spectrum": frechet_distance(_spectra(samples), _real_spectra(model_name)),
    }
    if samples.ndim == 5:
        result["temporal"] = temporal_consistency(feats)
    if reference is not None:
        result["psnr"] = psnr(samples, reference)
        result["ssim"] = ssim(samples, reference)
    return result


def reference_report(
    model_name: str,
    samples: int = 32,
    steps: tuple[int, ...] = (50, 25, 17, 10, 5),
    guidance: float | None = None,
    seed: int = 0,
) -> dict:
    """Quality of a reference model at several step counts, each scored against its 50-step (first)
    samples: how hard the fewer-steps baseline is. Also the FD of real samples (a floor)."""
    from ..metrics.classifier import real_samples
    from .pipeline import RefPipeline

    pipe = RefPipeline.from_pretrained(model_name)
    labels = balanced_labels(samples, pipe.spec.num_classes)
    rows = {}
    reference = None
    for n in steps:
        out = pipe(labels, num_inference_steps=n, guidance_scale=guidance, seed=seed)
        reference = out if reference is None else reference
        rows[n] = score(model_name, out, labels, None if n == steps[0] else reference)
    real, real_labels = real_samples(model_name, samples, seed=4321)
    rows["real"] = score(model_name, real, real_labels)
    return rows
