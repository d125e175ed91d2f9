import sys, torch, ditcache
from pathlib import Path
from ditcache.refmodels import RefPipeline
from ditcache.refmodels.evaluate import balanced_labels
from ditcache.metrics.quality import psnr
pipe = RefPipeline.from_pretrained("ref-image", weights_dir=Path("/tmp/fresh"))
labels = balanced_labels(16, pipe.spec.num_classes)
run = lambda n: pipe(labels, num_inference_steps=n, guidance_scale=None, seed=5, cfg_mode="separate")
with torch.no_grad():
    ref = run(50)
    for n in (33, 25):
        print(f"fewer steps {n}: {float(psnr(run(n), ref)):.2f} dB")
    for p in sys.argv[1:]:
        h = ditcache.apply(pipe, p)
        out = run(50); s = h.stats().last; h.remove()
        print(f"{p}: {float(psnr(out, ref)):.2f} dB, MACs {s.macs_speedup:.2f}x, reused {s.reused_forwards}, trials {s.trial_forwards}")
