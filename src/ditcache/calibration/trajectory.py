"""Sampling-trajectory geometry for OmniCache (trajectory): 3-D projection, curvature, reuse schedules."""

from __future__ import annotations

import numpy as np


def project_3d(trajectory: np.ndarray) -> np.ndarray:
    """(T, D) trajectory -> (T, 3) coordinates along u (start -> end) and two PCA directions of the
    trajectory projected onto u's orthogonal complement (paper Eq. 4-5)."""
    x = np.asarray(trajectory, dtype=np.float64).reshape(len(trajectory), -1)
    u = x[-1] - x[0]
    norm = np.linalg.norm(u)
    if norm == 0:
        raise ValueError("trajectory start and end coincide; no direction to project on")
    u /= norm
    along = x @ u
    rest = x - np.outer(along, u)
    centred = rest - rest.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    w = vt[:2] if len(vt) >= 2 else np.vstack([vt, np.zeros((2 - len(vt), x.shape[1]))])
    return np.stack([along, rest @ w[0], rest @ w[1]], axis=1)


def curvature(points: np.ndarray) -> np.ndarray:
    """Menger curvature at each interior point of a polyline (4 * area / product of side lengths);
    endpoints get +inf (never chosen for reuse). Zero on straight segments, 1/R on a circle of radius R."""
    p = np.asarray(points, dtype=np.float64)
    result = np.full(len(p), np.inf)
    for i in range(1, len(p) - 1):
        a, b, c = p[i - 1], p[i], p[i + 1]
        ab, bc, ac = np.linalg.norm(b - a), np.linalg.norm(c - b), np.linalg.norm(c - a)
        cross = np.linalg.norm(np.cross(b - a, c - a)) if p.shape[1] == 3 else 0.0
        denominator = ab * bc * ac
        result[i] = 0.0 if denominator == 0 else 2.0 * cross / denominator
    return result


def has_three_consecutive(steps: set[int] | list[int] | tuple[int, ...]) -> bool:
    chosen = set(steps)
    return any(s in chosen and s + 1 in chosen and s + 2 in chosen for s in chosen)


def select_reuse_steps(step_curvature: np.ndarray, fraction: float, warmup: int = 2) -> tuple[int, ...]:
    """Lowest-curvature steps, `fraction` of all steps, never three consecutive, none in warm-up."""
    if not 0.0 <= fraction < 2 / 3 + 1e-9:
        raise ValueError(f"fraction must be in [0, 2/3] (no three consecutive reuse steps), got {fraction}")
    n = len(step_curvature)
    target = int(round(fraction * n))
    order = sorted(range(warmup, n), key=lambda s: (step_curvature[s], s))
    chosen: set[int] = set()
    for step in order:
        if len(chosen) >= target:
            break
        if not has_three_consecutive(chosen | {step}):
            chosen.add(step)
    return tuple(sorted(chosen))
