"""Training of the reference models, class-conditional with a null class.

"flow" models (ref-image, ref-video, ref-latte) learn rectified flow (flow matching):

    x_sigma = (1 - sigma) * x0 + sigma * noise,   target velocity v = noise - x0,   timestep = 1000 * sigma

with sigma drawn logit-normal (as in SD3). "epsilon" models (ref-dit) learn DDPM noise prediction, as DiT:

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise,   target noise,   t uniform in 0..999, linear betas

with min-SNR-5 loss weights (the noise error of steps with SNR > 5 is scaled by 5 / SNR).

10% of labels are replaced by the null class so that the model also learns the unconditional prediction for
classifier-free guidance, and an EMA of the weights is what gets saved. Training stops at `max_steps` or
after `minutes` of CPU time of the training process (all its threads together; a run that shares the machine
gets as much compute as one on an idle machine), whichever comes first. `init_weights` continues from saved
weights (a run cut short, or a second phase): the budget then counts the new phase only, and the metadata
keeps the earlier phases.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import sample_images, sample_videos
from .models import RefModel, RefModelSpec, get_spec

WEIGHTS_DIR = Path(__file__).parent / "weights"


def draw_batch(spec: RefModelSpec, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, spec.num_classes, (batch,), generator=generator)
    return data_for(spec, labels, generator), labels


def data_for(spec: RefModelSpec, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training samples of `spec`'s data for these class labels, in pixels ([-1, 1], the model's sample shape)."""
    if spec.is_video:
        _, frames, h, _ = spec.sample_shape
        return sample_videos(labels, frames=frames, size=h, generator=generator)
    return sample_images(labels, size=spec.sample_shape[-1], generator=generator)


def flow_matching_loss(
    model: RefModel, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, label_dropout: float = 0.1
) -> torch.Tensor:
    b = x0.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator))  # logit-normal(0, 1)
    noise = torch.randn(x0.shape, generator=generator)
    shape = (b,) + (1,) * (x0.ndim - 1)
    x_sigma = (1 - sigma.view(shape)) * x0 + sigma.view(shape) * noise
    labels = _drop_labels(model, labels, generator, label_dropout)
    velocity = model.predict(x_sigma, sigma * 1000.0, labels)
    return (velocity - (noise - x0)).pow(2).mean()


MIN_SNR_GAMMA = 5.0


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """abar_t of DDPM's linear beta schedule (1e-4 .. 0.02), the schedule DiT and `ref-dit` use."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def epsilon_loss(
    model: RefModel, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, label_dropout: float = 0.1
) -> torch.Tensor:
    b = x0.shape[0]
    alphas_cumprod = ddpm_alphas_cumprod()
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    abar = alphas_cumprod[t].view((b,) + (1,) * (x0.ndim - 1))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    labels = _drop_labels(model, labels, generator, label_dropout)
    # Min-SNR-5 weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
    # the eps-loss of low-noise steps (SNR > 5) is scaled by 5 / SNR, so the high-noise steps that decide a
    # sample's layout and class get a fair share of a short training budget. The optimum is unchanged.
    snr = abar / (1 - abar)
    weight = (MIN_SNR_GAMMA / snr).clamp(max=1.0)
    return (weight * (model.predict(x_t, t, labels) - noise).pow(2)).mean()


def _drop_labels(model: RefModel, labels: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    drop = torch.rand(labels.shape[0], generator=generator) < p
    return torch.where(drop, torch.full_like(labels, model.spec.null_class), labels)


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
    init_weights: Path | None = None,
) -> dict:
    """Train one reference model; returns its metadata (also written next to the weights)."""
    spec = spec or get_spec(name)
    batch = batch or (64 if not spec.is_video else 16)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RefModel(spec)
    previous: list[dict] = []
    if init_weights is not None:
        init_weights = Path(init_weights)
        model.load_state_dict(load_file(str(init_weights)))
        meta_path = init_weights.with_suffix(".json")
        if meta_path.exists():
            earlier = json.loads(meta_path.read_text())
            previous = [*earlier.pop("phases", []), earlier]
    # DiT's label embedding drops labels itself in train mode; the loss drops them (seeded) instead.
    model.eval()
    loss_fn = epsilon_loss if spec.prediction == "epsilon" else flow_matching_loss
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 200
    start, cpu_start = time.time(), time.process_time()
    losses: list[float] = []
    bar = tqdm(total=max_steps, desc=f"train {spec.name}", disable=not progress, mininterval=5)
    step = 0
    while step < max_steps and time.process_time() - cpu_start < minutes * 60:
        # Linear warm-up, then cosine decay over the time budget (the step budget may be larger).
        progress_frac = min(1.0, max(step / max_steps, (time.process_time() - cpu_start) / (minutes * 60)))
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        x0, labels = draw_batch(spec, batch, generator)
        loss = loss_fn(model, x0, labels, generator)
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
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
    }
    if previous:
        meta["phases"] = previous
    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out_dir / f"{spec.name}.safetensors"), metadata={"name": spec.name})
    (out_dir / f"{spec.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
