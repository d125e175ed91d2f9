"""What the benchmark compares: each `Variant` is one way of generating with the same model and seeds.

A variant attaches to the pipeline right before a generation and detaches right after (so each run starts
from clean state and nothing leaks between interleaved runs), and reports its own statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Detach = Callable[[], dict[str, Any]]  # removes the method, returns its own stats


@dataclasses.dataclass
class Variant:
    label: str
    kind: str  # "baseline" | "fewer-steps" | "ditcache" | "peer"
    steps: int
    attach: Callable[[Any], Detach] | None = None
    skip_reason: str = ""  # non-empty: reported as skipped, never run

    @property
    def available(self) -> bool:
        return not self.skip_reason


def baseline(steps: int) -> Variant:
    return Variant(label=f"uncached {steps} steps", kind="baseline", steps=steps)


def fewer_steps(steps: int) -> Variant:
    return Variant(label=f"fewer steps ({steps})", kind="fewer-steps", steps=steps)


def ditcache_policy(name: str, steps: int) -> Variant:
    """A ditcache preset name, optionally with overrides ("precisecache-base:alpha=0.9")."""
    from .. import apply
    from ..registry import parse_policy

    try:
        parse_policy(name)
    except ValueError as error:
        raise ValueError(f"--policies: {error}") from None

    def attach(pipe: Any) -> Detach:
        handle = apply(pipe, name)

        def detach() -> dict[str, Any]:
            handle.remove()
            stats = handle.stats()
            g = stats.last
            return {
                "reused_forwards": g.reused_forwards,
                "partial_batch_forwards": g.partial_batch_forwards,
                "forwards": g.forwards,
                "blocks_per_forward": sum(g.blocks_computed) / max(1, g.forwards),
                "blocks_total": g.blocks_total,
                "stats_macs_speedup": g.macs_speedup,
                "trial_forwards": g.trial_forwards,
                "decide_seconds": g.decide_seconds,
            }

        return detach

    return Variant(label=name, kind="ditcache", steps=steps, attach=attach)
