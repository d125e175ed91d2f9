"""Writing samples to disk: image grids (PNG) and videos (animated GIF plus a PNG frame strip)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(samples: torch.Tensor, columns: int | None = None, scale: int = 4) -> Image.Image:
    """(B, 3, H, W) in [-1, 1] -> one PIL image, `columns` per row, upscaled by `scale` (nearest)."""
    b, _, h, w = samples.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    canvas = torch.zeros(3, rows * (h + 1) + 1, columns * (w + 1) + 1, dtype=torch.uint8)
    for i, sample in enumerate(_to_uint8(samples)):
        r, c = divmod(i, columns)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = sample
    image = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_samples(samples: torch.Tensor, path: str | Path) -> list[Path]:
    """Images -> grid PNG. Videos (B, 3, F, H, W) -> frame strip PNG (one row per video) and, for a
    .gif path, an animated GIF of the grid over time. Returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        image_grid(samples).save(path)
        return [path]
    b, _, f, _, _ = samples.shape
    strip = samples.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*F, 3, H, W): row = one video
    strip_path = path.with_suffix(".png")
    image_grid(strip, columns=f).save(strip_path)
    written = [strip_path]
    if path.suffix.lower() == ".gif":
        frames = [image_grid(samples[:, :, i]) for i in range(f)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0)
        written.insert(0, path)
    return written
