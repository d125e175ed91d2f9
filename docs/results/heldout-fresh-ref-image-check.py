"""Held-out check: presets on a ref-image retrained for a few minutes (weights in WEIGHTS_DIR).

Usage: python heldout-fresh-ref-image-check.py WEIGHTS_DIR PRESET [PRESET ...]
(after `ditcache train-ref ref-image --minutes 5 --seed 3 --out-dir WEIGHTS_DIR`); 16 samples, seed 5, PSNR
against the same model's uncached 50 steps, with fewer steps (33, 25) for reference.
"""

import sys
from pathlib import Path

import torch

import ditcache
from ditcache.metrics.quality import psnr
from ditcache.refmodels import RefPipeline
from ditcache.refmodels.evaluate import balanced_labels

pipe = RefPipeline.from_pretrained("ref-image", weights_dir=Path(sys.argv[1]))
labels = balanced_labels(16, pipe.spec.num_classes)


def run(steps: int) -> torch.Tensor:
    return pipe(labels, num_inference_steps=steps, guidance_scale=None, seed=5, cfg_mode="separate")


with torch.no_grad():
    reference = run(50)
    for steps in (33, 25):
        print(f"fewer steps {steps}: {float(psnr(run(steps), reference)):.2f} dB")
    for preset in sys.argv[2:]:
        handle = ditcache.apply(pipe, preset)
        out = run(50)
        stats = handle.stats().last
        handle.remove()
        print(
            f"{preset}: {float(psnr(out, reference)):.2f} dB, MACs {stats.macs_speedup:.2f}x, "
            f"reused forwards {stats.reused_forwards}, trials {stats.trial_forwards}"
        )
