"""A small CNN that tells which class photo a sample comes from; shipped per reference model.

It gives two distribution metrics that need no reference output:
- class accuracy of generated samples (does the sample look like its class?), in [0, 1];
- features (the 64-d penultimate layer) for the Fréchet distance and the temporal-consistency score.
Videos are classified frame by frame (logits averaged over frames).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..refmodels.data import CLASS_PHOTOS, sample_images, sample_videos
from ..refmodels.models import get_spec

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "refmodels" / "weights"
FEATURE_DIM = 64


class SampleClassifier(torch.nn.Module):
    def __init__(self, num_classes: int = len(CLASS_PHOTOS)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()
            )

        self.body = torch.nn.Sequential(
            block(3, 32),
            block(32, 32),
            torch.nn.AvgPool2d(2),
            block(32, 64),
            block(64, 64),
            torch.nn.AvgPool2d(2),
            block(64, FEATURE_DIM),
        )
        self.head = torch.nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 64)."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def as_frames(samples: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Videos (B, C, F, H, W) -> their frames (B*F, C, H, W) and F; images pass through with F = 1."""
    if samples.ndim == 5:  # (B, C, F, H, W)
        return samples.permute(0, 2, 1, 3, 4).flatten(0, 1), samples.shape[2]
    return samples, 1


def _real_batch(model_name: str, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    spec = get_spec(model_name)
    if spec.is_video:
        _, frames, h, _ = spec.sample_shape
        return sample_videos(labels, frames=frames, size=h, generator=generator)
    return sample_images(labels, size=spec.sample_shape[-1], generator=generator)


def real_samples(model_name: str, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """n real samples (and labels) from the model's training distribution, balanced over classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASS_PHOTOS)
    return _real_batch(model_name, labels, generator), labels


def train_classifier(
    model_name: str,
    steps: int = 1500,
    batch: int = 64,
    seed: int = 0,
    progress: bool = True,
    out_dir: Path | None = None,
) -> float:
    """Train on real samples with light noise augmentation; returns held-out accuracy on real samples."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = SampleClassifier()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    spec = get_spec(model_name)
    per_item = spec.sample_shape[1] if spec.is_video else 1  # a video gives `frames` training images
    for _ in tqdm(range(steps), desc=f"classifier {model_name}", disable=not progress, mininterval=5):
        labels = torch.randint(0, len(CLASS_PHOTOS), (max(1, batch // per_item),), generator=generator)
        frames, nf = as_frames(_real_batch(model_name, labels, generator))
        frames = frames + 0.05 * torch.randn(frames.shape, generator=generator)  # robust to sampler noise
        loss = F.cross_entropy(net(frames), labels.repeat_interleave(nf))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    held_out, labels = real_samples(model_name, 256, seed=999)
    accuracy = class_accuracy(net, held_out, labels)
    out = Path(out_dir or WEIGHTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"classifier-{model_name}.safetensors")
    )
    return accuracy


def load_classifier(model_name: str, weights_dir: Path | None = None) -> SampleClassifier:
    """The shipped classifier of a reference model's data (`ref-dit` shares ref-image's, `ref-latte` ref-video's)."""
    model_name = get_spec(model_name).classifier_name
    path = Path(weights_dir or WEIGHTS_DIR) / f"classifier-{model_name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no classifier for {model_name} at {path}; run `ditcache train-ref {model_name}`")
    net = SampleClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def class_accuracy(net: SampleClassifier, samples: torch.Tensor, labels: torch.Tensor) -> float:
    frames, nf = as_frames(samples)
    logits = net(frames.clamp(-1, 1)).view(len(labels), nf, -1).mean(1)
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def sample_features(net: SampleClassifier, samples: torch.Tensor) -> torch.Tensor:
    """(B, 64) for images; (B, F, 64) for videos."""
    frames, nf = as_frames(samples)
    feats = net.features(frames.clamp(-1, 1))
    return feats.view(samples.shape[0], nf, -1) if samples.ndim == 5 else feats
