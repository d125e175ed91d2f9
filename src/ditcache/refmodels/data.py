"""Training data made only from photos that ship inside scikit-image.

Each class is one photo. An image sample is a random crop of it (random scale, position and flip),
resampled to `size` x `size`; a video sample is a camera pan: a crop window that moves with a random
velocity (and slowly zooms) over the photo, one crop per frame. Samples are drawn on the fly with
`grid_sample`, so the data set is effectively infinite and deterministic for a given seed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

CLASS_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
SOURCE_SIZE = 128


@functools.lru_cache(maxsize=1)
def class_photos() -> torch.Tensor:
    """(num_classes, 3, 128, 128) in [-1, 1]: each photo squashed to a square."""
    import skimage.data

    photos = []
    for name in CLASS_PHOTOS:
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
        tensor = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 127.5 - 1.0
        photos.append(F.interpolate(tensor[None], size=(SOURCE_SIZE, SOURCE_SIZE), mode="area")[0])
    return torch.stack(photos)


def _affine_grid(
    scale: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    # Maps output pixel coords in [-1, 1] to the source window centred at (cx, cy) of half-size `scale`.
    n = scale.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return F.affine_grid(theta, (n, 3, size, size), align_corners=False)


def sample_images(labels: torch.Tensor, size: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, size, size) random crops of the class photos, in [-1, 1]."""
    n = labels.shape[0]
    g = generator
    scale = 0.25 + 0.45 * torch.rand(n, generator=g)  # window covers 25%..70% of the photo's side
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - scale)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - scale)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    grid = _affine_grid(scale, cx, cy, flip, size)
    photos = class_photos()[labels]
    return F.grid_sample(photos, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def sample_videos(
    labels: torch.Tensor, frames: int = 8, size: int = 16, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 3, frames, size, size) camera pans over the class photos, in [-1, 1]."""
    n = labels.shape[0]
    g = generator
    scale = 0.3 + 0.3 * torch.rand(n, generator=g)
    speed = 0.03 + 0.05 * torch.rand(n, generator=g)  # window centre moves this much per frame
    angle = torch.rand(n, generator=g) * 2 * torch.pi
    zoom = 1.0 + (torch.rand(n, generator=g) * 2 - 1) * 0.03  # per-frame zoom factor
    span = speed * (frames - 1) / 2
    cx0 = (torch.rand(n, generator=g) * 2 - 1) * (1 - scale - span).clamp(min=0) - span * torch.cos(angle)
    cy0 = (torch.rand(n, generator=g) * 2 - 1) * (1 - scale - span).clamp(min=0) - span * torch.sin(angle)
    photos = class_photos()[labels]
    out = []
    for f in range(frames):
        s = (scale * zoom**f).clamp(max=0.95)
        grid = _affine_grid(
            s, cx0 + f * speed * torch.cos(angle), cy0 + f * speed * torch.sin(angle), torch.ones(n), size
        )
        out.append(F.grid_sample(photos, grid, mode="bilinear", padding_mode="reflection", align_corners=False))
    return torch.stack(out, dim=2)
