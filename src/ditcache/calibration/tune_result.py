"""What `ditcache.tune` measures: one row per candidate (`Candidate`), the table and the winner (`TuneResult`),
and the latent PSNR they are ranked by."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ..config import PolicyConfig
from .profiles import Profile


@dataclasses.dataclass
class Candidate:
    """One measured candidate: MACs speedup and PSNR (dB, final latent vs uncached; `inf` when identical), and
    the fewer-steps baseline at that speedup where the generation can run with another step count."""

    spec: str
    config: PolicyConfig | None
    macs_speedup: float | None = None
    psnr: float | None = None
    fewer_steps: int | None = None  # round(num_steps / macs_speedup)
    fewer_steps_psnr: float | None = None
    error: str | None = None  # why it could not be measured

    @property
    def margin(self) -> float | None:
        """PSNR minus the fewer-steps PSNR at the same MACs speedup (dB)."""
        if self.psnr is None or self.fewer_steps_psnr is None:
            return None
        if math.isinf(self.psnr) and math.isinf(self.fewer_steps_psnr):
            return 0.0
        return self.psnr - self.fewer_steps_psnr

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (an infinite PSNR is written as None with `identical: true`)."""

        def finite(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, 4)

        return {
            "spec": self.spec,
            "macs_speedup": finite(self.macs_speedup),
            "psnr": finite(self.psnr),
            "identical": self.psnr is not None and math.isinf(self.psnr),
            "fewer_steps": self.fewer_steps,
            "fewer_steps_psnr": finite(self.fewer_steps_psnr),
            "margin": finite(self.margin),
            "error": self.error,
        }


@dataclasses.dataclass
class TuneResult:
    """What `ditcache.tune` measured: every candidate, the winner (None when no candidate reaches `speedup`)
    and where its "auto" profile was saved."""

    speedup: float
    num_steps: int
    candidates: list[Candidate]
    winner: Candidate | None
    profile: Profile | None = None
    saved_to: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. why there is no fewer-steps baseline

    @property
    def config(self) -> PolicyConfig | None:
        return self.winner.config if self.winner is not None else None

    @property
    def spec(self) -> str | None:
        return self.winner.spec if self.winner is not None else None

    def reaching(self) -> list[Candidate]:
        """Candidates whose MACs speedup reaches the requested one, best PSNR first."""
        ok = [c for c in self.candidates if c.error is None and c.macs_speedup >= self.speedup - 1e-9]
        return sorted(ok, key=lambda c: (-c.psnr, -c.macs_speedup))

    def table(self) -> str:
        """Markdown: the candidates that reach the speedup (best PSNR first), then the others (fastest first),
        then those that failed."""
        reaching = self.reaching()
        others = sorted(
            (c for c in self.candidates if c.error is None and c not in reaching), key=lambda c: -c.macs_speedup
        )
        failed = [c for c in self.candidates if c.error is not None]
        lines = [
            f"candidates at {self.num_steps} steps, requested MACs speedup {self.speedup:g}x "
            f"({len(reaching)} of {len(self.candidates)} reach it)",
            "",
            "| candidate | MACs speedup | PSNR vs uncached | fewer steps, same speedup | margin | |",
            "|---|---|---|---|---|---|",
        ]
        for c in [*reaching, *others]:
            fewer = f"{c.fewer_steps} steps: {_db(c.fewer_steps_psnr)}" if c.fewer_steps is not None else "–"
            margin = f"{c.margin:+.1f} dB" if c.margin is not None else "–"
            mark = "**winner**" if c is self.winner else ("reaches" if c in reaching else "")
            lines.append(f"| {c.spec} | {c.macs_speedup:.2f}x | {_db(c.psnr)} | {fewer} | {margin} | {mark} |")
        for c in failed:
            lines.append(f"| {c.spec} | – | – | – | – | failed: {c.error} |")
        if self.notes:
            lines += ["", *(f"note: {note}" for note in self.notes)]
        return "\n".join(lines)


class TuneError(ValueError):
    """No candidate reaches the requested speedup; `.result` holds every measured candidate."""

    def __init__(self, message: str, result: TuneResult) -> None:
        super().__init__(message)
        self.result = result


def _db(value: float | None) -> str:
    if value is None:
        return "–"
    return "identical" if math.isinf(value) else f"{value:.1f} dB"


def latent_psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) over samples of two final latents; the peak is the reference's value range (max - min).
    `inf` when identical."""
    if output.shape != reference.shape:
        raise ValueError(f"final latent shape {tuple(output.shape)} != uncached {tuple(reference.shape)}")
    out, ref = output.detach().double().cpu(), reference.detach().double().cpu()
    peak = float(ref.max() - ref.min()) or 1.0
    values = []
    for a, b in zip(out, ref):
        mse = float(((a - b) ** 2).mean())
        values.append(math.inf if mse == 0.0 else 10.0 * math.log10(peak**2 / mse))
    return float(sum(values) / len(values))
