"""Training of the reference models: rectified flow (flow matching), class-conditional with a null class.

    x_sigma = (1 - sigma) * x0 + sigma * noise,   target velocity v = noise - x0

sigma is drawn logit-normal (as in SD3), 10% of labels are replaced by the null class so that the model
also learns the unconditional velocity for classifier-free guidance, and an EMA of the weights is what
gets saved. Training stops at `max_steps` or after `minutes`, whichever comes first.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .data import sample_images, sample_videos
from .models import RefModel, RefModelSpec, get_spec

WEIGHTS_DIR = Path(__file__).parent / "weights"


def draw_batch(spec: RefModelSpec, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, spec.num_classes, (batch,), generator=generator)
    if spec.is_video:
        _, frames, h, _ = spec.sample_shape
        return sample_videos(labels, frames=frames, size=h, generator=generator), labels
    return sample_images(labels, size=spec.sample_shape[-1], generator=generator), labels


def flow_matching_loss(
    model: RefModel, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, label_dropout: float = 0.1
) -> torch.Tensor:
    b = x0.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator))  # logit-normal(0, 1)
    noise = torch.randn(x0.shape, generator=generator)
    shape = (b,) + (1,) * (x0.ndim - 1)
    x_sigma = (1 - sigma.view(shape)) * x0 + sigma.view(shape) * noise
    drop = torch.rand(b, generator=generator) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, model.spec.null_class), labels)
    velocity = model.predict(x_sigma, sigma, labels)
    return (velocity - (noise - x0)).pow(2).mean()


def train(
    name: str,
    *,
    max_steps: int = 100_000,
    minutes: float = 25.0,
    batch: int | None = None,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    out_dir: Path | None = None,
    spec: RefModelSpec | None = None,
    progress: bool = True,
) -> dict:
    """Train one reference model; returns its metadata (also written next to the weights)."""
    spec = spec or get_spec(name)
    batch = batch or (64 if not spec.is_video else 16)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RefModel(spec)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 200
    start = time.time()
    losses: list[float] = []
    bar = tqdm(total=max_steps, desc=f"train {spec.name}", disable=not progress, mininterval=5)
    step = 0
    while step < max_steps and time.time() - start < minutes * 60:
        # Linear warm-up, then cosine decay over the time budget (the step budget may be larger).
        progress_frac = min(1.0, max(step / max_steps, (time.time() - start) / (minutes * 60)))
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        x0, labels = draw_batch(spec, batch, generator)
        loss = flow_matching_loss(model, x0, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    bar.close()
    meta = {
        "name": spec.name,
        "steps": step,
        "batch": batch,
        "seed": seed,
        "train_seconds": round(time.time() - start, 1),
        "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
    }
    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out_dir / f"{spec.name}.safetensors"), metadata={"name": spec.name})
    (out_dir / f"{spec.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
