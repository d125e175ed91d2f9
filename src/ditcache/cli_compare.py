"""`ditcache compare`: uncached | cached | fewer steps at equal MACs | difference heat maps, side by side.

One row per sample; the columns are the uncached output, the output with the cached policy, the uncached
output with fewer steps at the cached run's MACs speedup (`equal_macs_steps`: the step count whose MACs match
the cached run's, rounded; MACs counted by the engine), then |cached - uncached| and |fewer steps - uncached|
as heat maps on one shared scale (black 0, bright = the largest difference of the two, printed). Videos show
their frames side by side in each cell. PSNR of both against the uncached output is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from .engine.stats import Stats

SCALE = 4  # nearest-neighbour upscaling of the grid (visual.image_grid)
HEADER_PX = 24  # the strip of column titles above the grid
HEAT_COLORMAP = "inferno"


@dataclasses.dataclass
class Comparison:
    """The three generations of one comparison and what was measured on them."""

    policy: str
    steps: int
    fewer_steps: int
    macs_speedup: float  # the cached run's, engine count
    uncached: torch.Tensor
    cached: torch.Tensor
    fewer: torch.Tensor
    stats: Stats

    @property
    def fewer_macs_speedup(self) -> float:
        return self.steps / self.fewer_steps

    def psnr(self) -> tuple[float, float]:
        """(cached, fewer steps) PSNR vs uncached, mean over samples (dB)."""
        from .metrics.quality import psnr

        return psnr(self.cached, self.uncached), psnr(self.fewer, self.uncached)

    def psnr_per_sample(self) -> list[tuple[float, float]]:
        from .metrics.quality import psnr

        pairs = zip(self.cached, self.fewer, self.uncached)
        return [(psnr(c[None], u[None]), psnr(f[None], u[None])) for c, f, u in pairs]


def equal_macs_steps(steps: int, macs_speedup: float) -> int:
    """The step count whose MACs match a cached run of `steps` steps at `macs_speedup`, rounded, in [1, steps]."""
    if not macs_speedup > 0:
        raise ValueError(f"macs_speedup must be > 0, got {macs_speedup!r}")
    return max(1, min(steps, round(steps / macs_speedup)))


def run_comparison(
    pipe: Any, run_for: Callable[[int], Callable[[], torch.Tensor]], policy: str, steps: int
) -> Comparison:
    """Uncached, cached with `policy` (a preset, overrides allowed) and fewer steps at equal MACs, all from
    `run_for(n)` (one generation of `n` steps with fixed labels and seed, e.g. `bench.runner.reference_runs`)."""
    from . import apply

    with torch.no_grad():
        uncached = run_for(steps)()
        handle = apply(pipe, policy)
        try:
            cached = run_for(steps)()
            stats = handle.stats()
        finally:
            handle.remove()
        macs_speedup = stats.last.macs_speedup
        fewer_steps = equal_macs_steps(steps, macs_speedup)
        fewer = run_for(fewer_steps)()
    return Comparison(policy, steps, fewer_steps, macs_speedup, uncached, cached, fewer, stats)


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) as is; videos (B, 3, F, H, W) -> (B, 3, H, F * W), frames side by side."""
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        return x.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w)
    return x


def heat_maps(diffs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Mean |difference| over channels as colour images in [-1, 1] on one shared scale; returns the scale too."""
    import matplotlib

    maps = [d.abs().mean(1) for d in diffs]  # (B, H, W) each, in [0, 2]
    top = max(float(m.max()) for m in maps)
    scale = top if top > 0 else 1.0  # identical outputs: all black
    colormap = matplotlib.colormaps[HEAT_COLORMAP]
    images = [
        torch.from_numpy(colormap((m / scale).numpy())[..., :3]).permute(0, 3, 1, 2).float() * 2 - 1 for m in maps
    ]
    return images, top


def column_titles(comparison: Comparison) -> list[str]:
    return [
        f"uncached {comparison.steps}",
        f"{comparison.policy} {comparison.macs_speedup:.2f}x",
        f"{comparison.fewer_steps} steps {comparison.fewer_macs_speedup:.2f}x",
        "|cached - unc.|",
        "|fewer - unc.|",
    ]


def compare_grid(comparison: Comparison) -> tuple[Image.Image, float]:
    """The grid image (one row per sample, `column_titles` above) and the heat maps' scale."""
    from .visual import image_grid

    uncached, cached, fewer = (
        _as_images(x.float()) for x in (comparison.uncached, comparison.cached, comparison.fewer)
    )
    heats, top = heat_maps([cached - uncached, fewer - uncached])
    cells = torch.stack([uncached, cached, fewer, *heats], dim=1)  # (B, columns, 3, H, W): row-major
    columns = cells.shape[1]
    grid = image_grid(cells.flatten(0, 1), columns=columns, scale=SCALE)
    image = Image.new("RGB", (grid.width, grid.height + HEADER_PX), "white")
    image.paste(grid, (0, HEADER_PX))
    draw = ImageDraw.Draw(image)
    cell = grid.width / columns
    for i, title in enumerate(column_titles(comparison)):
        draw.text((i * cell + 4, 6), title, fill="black")
    return image, top


def _cmd_compare(args: argparse.Namespace) -> int:
    from .bench.runner import reference_runs
    from .refmodels import RefPipeline
    from .refmodels.evaluate import balanced_labels

    for name in ("steps", "samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    pipe = RefPipeline.from_pretrained(args.model)
    labels = balanced_labels(args.samples, pipe.spec.num_classes)
    run_for = reference_runs(pipe, labels, args.guidance, args.seed, args.cfg)
    comparison = run_comparison(pipe, run_for, args.policy, args.steps)
    report(comparison, args.out, f"{args.model}, {args.samples} samples, seed {args.seed}")
    return 0


def report(comparison: Comparison, out: str | Path, what: str) -> Path:
    """Write the grid to `out` and print the speeds and PSNRs."""
    image, top = compare_grid(comparison)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    cached_db, fewer_db = comparison.psnr()
    print(f"{what}, {comparison.steps} steps")
    print(comparison.stats.summary())
    print(
        f"fewer steps at equal MACs: {comparison.fewer_steps} steps ({comparison.fewer_macs_speedup:.2f}x MACs; "
        f"cached {comparison.macs_speedup:.2f}x, rounded to a whole step count)"
    )
    print(
        f"PSNR vs uncached: {comparison.policy} {cached_db:.2f} dB, fewer steps ({comparison.fewer_steps}) "
        f"{fewer_db:.2f} dB, difference {cached_db - fewer_db:+.2f} dB"
    )
    per_sample = ", ".join(f"{c:.1f}/{f:.1f}" for c, f in comparison.psnr_per_sample())
    print(f"per sample (cached/fewer dB): {per_sample}")
    print(f"heat maps: black 0, brightest {top:.3f} mean |difference| per pixel (pixels in [-1, 1])")
    print(f"wrote {path} (rows: samples; columns: " + " | ".join(column_titles(comparison)) + ")")
    return path


def add_compare_parser(sub: Any, models: Sequence[str]) -> None:
    """Register `ditcache compare` on the main parser's subparsers."""
    cmp = sub.add_parser(
        "compare",
        help="grid image: uncached | cached | fewer steps at equal MACs | difference heat maps, PSNR of each",
    )
    cmp.add_argument("--model", default="ref-image", choices=models, help="reference model (default ref-image)")
    cmp.add_argument("--policy", default="fora-3", help="preset, overrides allowed (default fora-3)")
    cmp.add_argument("--steps", type=int, default=50, help="sampling steps of the uncached and cached runs")
    cmp.add_argument("--samples", type=int, default=4, help="rows of the grid, classes cycled (default 4)")
    cmp.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    cmp.add_argument("--cfg", default="separate", choices=("separate", "batched"), help="CFG as 2 forwards or 1")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--out", default="compare.png", help="grid image (PNG)")
    cmp.set_defaults(func=_cmd_compare)
