"""The frontier report: at each MACs speed class, the best ditcache row, the best peer row and fewer steps.

Definitions (what the numbers mean, precisely):
- Candidates are the rows that ran (`status == "ok"`) with a finite PSNR vs the uncached output.
- A row is *in* speed class `s` when its MACs speedup is >= `s - tolerance` (default 0.1): a faster row
  counts too, so the pick is the upper envelope of PSNR over speed, read at `s - tolerance`.
- The *best ditcache row* and the *best peer row* of a class are the rows of that kind in the class with the
  highest PSNR (ties: the faster row). No row of the kind in the class -> the pick is missing, with why.
- *Fewer steps at equal MACs* is read at the best ditcache row's MACs speedup (at `s` when there is none):
  PSNR interpolated linearly in MACs (1 / speedup, i.e. in the step count) between the two measured
  fewer-steps rows that bracket that speed; a measured row at exactly that speed is used as is. Outside the
  measured fewer-steps range it is missing (extrapolating PSNR toward the uncached model's infinite PSNR
  would be a guess).
- The differences are ditcache minus peer and ditcache minus fewer steps, in dB.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .runner import Row

SPEED_CLASSES = (1.5, 2.0, 3.0)
TOLERANCE = 0.1
KINDS = ("ditcache", "peer", "fewer-steps")


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured row on the speed / fidelity plane."""

    label: str
    macs_speedup: float
    psnr: float
    efficiency: float = math.nan  # wall speedup / MACs speedup of the row


@dataclasses.dataclass(frozen=True)
class FewerSteps:
    """Fewer steps read at one MACs speedup: `low` and `high` are the measured rows around it (the same row
    when one was measured at that speed)."""

    macs_speedup: float
    psnr: float
    steps: float  # the (fractional) step count at that speed
    low: Point
    high: Point

    @property
    def interpolated(self) -> bool:
        return self.low != self.high


@dataclasses.dataclass(frozen=True)
class SpeedClass:
    speed: float
    tolerance: float
    ditcache: Point | None
    peer: Point | None
    fewer: FewerSteps | None
    missing: tuple[str, ...] = ()  # why a pick is absent, one line each

    @property
    def vs_peer(self) -> float:
        return self.ditcache.psnr - self.peer.psnr if self.ditcache and self.peer else math.nan

    @property
    def vs_fewer(self) -> float:
        return self.ditcache.psnr - self.fewer.psnr if self.ditcache and self.fewer else math.nan


@dataclasses.dataclass(frozen=True)
class Frontier:
    steps: int  # the uncached step count: fewer-steps rows are priced against it
    classes: tuple[SpeedClass, ...]
    envelopes: dict[str, tuple[Point, ...]]  # kind -> its upper envelope, slowest first

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "classes": [dataclasses.asdict(c) | {"vs_peer": c.vs_peer, "vs_fewer": c.vs_fewer} for c in self.classes]
        }


def points(rows: Sequence[Row], kind: str) -> list[Point]:
    """The candidate rows of one kind, slowest first."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    chosen = [
        Point(r.label, r.macs_speedup, r.psnr, r.efficiency)
        for r in rows
        if r.kind == kind and r.status == "ok" and math.isfinite(r.psnr) and math.isfinite(r.macs_speedup)
    ]
    return sorted(chosen, key=lambda p: (p.macs_speedup, p.psnr))


def upper_envelope(candidates: Sequence[Point]) -> tuple[Point, ...]:
    """The points no other point beats on both speed and PSNR, slowest first."""
    kept: list[Point] = []
    best = -math.inf
    for p in sorted(candidates, key=lambda p: (-p.macs_speedup, -p.psnr)):  # fastest first
        if p.psnr > best:
            kept.append(p)
            best = p.psnr
    return tuple(reversed(kept))


def best_in_class(candidates: Sequence[Point], speed: float, tolerance: float = TOLERANCE) -> Point | None:
    """The highest-PSNR point with MACs speedup >= speed - tolerance (ties: the faster one)."""
    inside = [p for p in candidates if p.macs_speedup >= speed - tolerance]
    return max(inside, key=lambda p: (p.psnr, p.macs_speedup)) if inside else None


def fewer_steps_at(candidates: Sequence[Point], speed: float, steps: int) -> FewerSteps | None:
    """Fewer steps' PSNR at `speed`, linear in MACs between the measured rows around it (None outside them)."""
    ordered = sorted(candidates, key=lambda p: p.macs_speedup)
    for p in ordered:
        if math.isclose(p.macs_speedup, speed, rel_tol=1e-9):
            return FewerSteps(speed, p.psnr, steps / speed, p, p)
    for low, high in zip(ordered, ordered[1:]):
        if low.macs_speedup < speed < high.macs_speedup:
            # MACs fraction 1/speed is proportional to the step count: interpolate in it, not in speed.
            t = (1 / speed - 1 / low.macs_speedup) / (1 / high.macs_speedup - 1 / low.macs_speedup)
            return FewerSteps(speed, low.psnr + t * (high.psnr - low.psnr), steps / speed, low, high)
    return None


def frontier(
    rows: Sequence[Row], steps: int, speeds: Sequence[float] = SPEED_CLASSES, tolerance: float = TOLERANCE
) -> Frontier:
    """The frontier report of one bench run's rows (`steps`: the uncached step count)."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    by_kind = {kind: points(rows, kind) for kind in KINDS}
    classes = tuple(_speed_class(by_kind, speed, steps, tolerance) for speed in speeds)
    return Frontier(steps, classes, {kind: upper_envelope(p) for kind, p in by_kind.items()})


def _speed_class(by_kind: dict[str, list[Point]], speed: float, steps: int, tolerance: float) -> SpeedClass:
    floor = speed - tolerance
    ditcache = best_in_class(by_kind["ditcache"], speed, tolerance)
    peer = best_in_class(by_kind["peer"], speed, tolerance)
    at = ditcache.macs_speedup if ditcache else speed
    fewer = fewer_steps_at(by_kind["fewer-steps"], at, steps)
    missing = []
    for kind, pick in (("ditcache", ditcache), ("peer", peer)):
        if pick is None:
            fastest = max((p.macs_speedup for p in by_kind[kind]), default=None)
            why = "no rows" if fastest is None else f"the fastest reaches {fastest:.2f}x"
            missing.append(f"no {kind} row at >= {floor:.2f}x MACs ({why})")
    if fewer is None:
        speeds = [p.macs_speedup for p in by_kind["fewer-steps"]]
        span = f"{min(speeds):.2f}x-{max(speeds):.2f}x" if speeds else "none"
        missing.append(f"fewer steps not measured around {at:.2f}x (measured: {span}; add --fewer-steps)")
    return SpeedClass(speed, tolerance, ditcache, peer, fewer, tuple(missing))


def _pick(point: Point | None) -> str:
    if point is None:
        return "–"
    efficiency = f", wall/MACs {point.efficiency:.2f}" if math.isfinite(point.efficiency) else ""
    return f"{point.label} ({point.macs_speedup:.2f}x{efficiency})"


def _fewer(fewer: FewerSteps | None, steps: int) -> str:
    if fewer is None:
        return "–"
    if not fewer.interpolated:
        return f"{fewer.low.label} ({fewer.macs_speedup:.2f}x)"
    around = f"{round(steps / fewer.low.macs_speedup)} / {round(steps / fewer.high.macs_speedup)}"
    return f"{fewer.steps:.1f} steps at {fewer.macs_speedup:.2f}x (interpolated, {around} steps)"


def _db(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(report: Frontier) -> str:
    """The side-by-side table, with the definitions in one line under it and what is missing."""
    lines = [
        "| MACs class | best ditcache | PSNR dB | best peer | PSNR dB | fewer steps at equal MACs | PSNR dB "
        "| vs peer dB | vs fewer steps dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report.classes:
        psnrs = [p.psnr if p else math.nan for p in (c.ditcache, c.peer, c.fewer)]
        cells = [f">= {c.speed - c.tolerance:.2f}x ({c.speed:g}x)", _pick(c.ditcache), _db(psnrs[0])]
        cells += [_pick(c.peer), _db(psnrs[1]), _fewer(c.fewer, report.steps), _db(psnrs[2])]
        cells += [_db(c.vs_peer, signed=True), _db(c.vs_fewer, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    tolerance = report.classes[0].tolerance if report.classes else TOLERANCE
    lines.append(
        f"Best row = highest PSNR among rows with MACs speedup >= class - {tolerance:g}; fewer steps at the "
        "best ditcache row's MACs speedup, PSNR interpolated linearly in MACs between the measured fewer-steps "
        "rows around it."
    )
    for c in report.classes:
        lines += [f"- {c.speed:g}x: {why}" for why in c.missing]
    return "\n".join(lines)


def plot(report: Frontier, ax: Any, title: str = "") -> None:  # ax: a matplotlib Axes (imported lazily)
    """The three upper envelopes (PSNR vs MACs speedup) on one matplotlib axes, speed classes marked."""
    styles = {"ditcache": ("s-", "tab:blue"), "peer": ("^-", "tab:orange"), "fewer-steps": ("o--", "gray")}
    for kind, (style, color) in styles.items():
        envelope = report.envelopes.get(kind, ())
        if envelope:
            xs, ys = [p.macs_speedup for p in envelope], [p.psnr for p in envelope]
            ax.plot(xs, ys, style, color=color, label=f"{kind} frontier")
            for p in envelope:
                ax.annotate(p.label, (p.macs_speedup, p.psnr), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for c in report.classes:
        ax.axvline(c.speed - c.tolerance, color="black", alpha=0.15, linestyle=":")
    ax.set_xlabel("MACs speedup vs uncached (x)")
    ax.set_ylabel("PSNR vs uncached output (dB)")
    ax.set_title(title or "frontiers: best PSNR at each speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
