"""Block-residual reuse for policies that skip every block of a forward or none (FORA-style static intervals,
TeaCache): the residuals are kept per *segment* rather than per block.

A segment is a run of consecutive hooked blocks that hand their carried tensors straight to each other: each
block's inputs are the previous block's outputs, the same tensor objects, not written in place since (no model
code in between; Flux's double- and single-stream lists form one segment, Latte's spatial and temporal blocks,
with a reshape between them, one segment each). A computed forward keeps one residual per segment, last output
minus first input; a reused forward adds the (forecast) residual at the segment's first block and hands it on
through the others. Residual forecasts are linear in the cached values, so this equals adding every block's own
(forecast) residual up to rounding, at a fraction of the cost: one subtraction, one finiteness probe and one
forecast per carried tensor and segment instead of per block, which is most of a reused step's work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..engine.calls import BlockCall, ForwardCall
from ..engine.forecast import Forecaster, History
from .base import Residuals


@dataclasses.dataclass
class _OpenSegment:
    """The segment the running computed forward is inside."""

    start: int  # position of its first block
    names: frozenset[str]  # the carried outputs
    inputs: dict[str, torch.Tensor | None]  # the first block's inputs
    last: int  # position of the last block run
    outputs: dict[str, torch.Tensor | None]  # what that block returned
    versions: dict[str, int | None]  # their in-place write counters when it returned


def _version(value: torch.Tensor | None) -> int | None:
    """The in-place write counter; None for None and for inference-mode tensors, which keep none (they never
    join a segment: a write between two blocks could not be seen)."""
    if value is None or value.is_inference():
        return None
    return value._version


@dataclasses.dataclass
class BlockSegments:
    """The residuals of a branch's last computed forward, one per segment, and their forecast histories."""

    residuals: dict[int, Residuals] = dataclasses.field(default_factory=dict)  # first position -> residuals
    histories: dict[int, History] = dataclasses.field(default_factory=dict)  # first position -> forecast input
    inside: set[int] = dataclasses.field(default_factory=set)  # positions after a segment's first block
    _open: _OpenSegment | None = None
    _computing: bool = False  # the running forward has run a block

    def complete(self, num_blocks: int) -> bool:
        """Every block belongs to a stored segment: a forward may skip them all."""
        return len(self.residuals) + len(self.inside) == num_blocks

    def begin(self) -> None:
        """Start of a forward (also forgets a segment left open by a forward that raised)."""
        self._open, self._computing = None, False

    def run(self, call: BlockCall) -> Any:
        """Compute the block, extending the open segment or starting a new one."""
        if not self._computing:  # a computed forward replaces the whole layout
            self._computing, self.residuals, self.inside = True, {}, set()
        inputs = call.inputs()
        output = call.run()
        outputs = call.outputs_of(output)
        versions = {name: _version(value) for name, value in outputs.items()}
        position, names = call.ref.position, frozenset(call.ref.spec.outputs)
        segment = self._open
        if segment is not None and _continues(segment, position, names, inputs, outputs):
            segment.last, segment.outputs, segment.versions = position, outputs, versions
            self.inside.add(position)
            return output
        self._close(call.forward)
        self._open = _OpenSegment(position, names, inputs, position, outputs, versions)
        return output

    def _close(self, forward: ForwardCall) -> None:
        segment, self._open = self._open, None
        if segment is not None:
            residuals = BlockCall.residuals(segment.inputs, segment.outputs)
            self.residuals[segment.start] = forward.store(residuals)

    def finish(self, call: ForwardCall, forecaster: Forecaster) -> None:
        """End of the policy's forward: after a computed one, store the last segment and record every
        segment's residuals, computed at this step, in its forecast history."""
        if not self._computing:
            return
        self._close(call)
        self._computing = False
        for stale in set(self.histories) - set(self.residuals):
            del self.histories[stale]
        for start, residuals in self.residuals.items():
            forecaster.remember_at(call, self.histories, start, call.info.step, residuals)

    def skip(self, call: BlockCall, forecaster: Forecaster) -> Any:
        """A reused forward: the segment's first block adds its (forecast) residual, the others hand it on."""
        position = call.ref.position
        if position in self.inside:
            return call.passthrough()
        history = self.histories.get(position)
        return call.skip(forecaster.predict(history, call.info.step, self.residuals[position]))


def _continues(segment: _OpenSegment, position: int, names: frozenset[str], inputs: dict, outputs: dict) -> bool:
    """The block at `position` took the open segment's last outputs, untouched, as its inputs, and returned a
    tensor for each (a block returning None, SD3's last text stream, starts a segment of its own, so that a
    reused forward hands None on only where the model does)."""
    if position != segment.last + 1 or names != segment.names:
        return False
    for name in names:
        value, version = inputs.get(name), segment.versions[name]
        if value is None or outputs.get(name) is None or value is not segment.outputs.get(name):
            return False
        if version is None or _version(value) != version:
            return False
    return True


def skip_or_run_block(call: BlockCall, skip: bool, forecaster: Forecaster, segments: BlockSegments) -> Any:
    """The block hook of a policy that skips every block of a forward or none (`skip` the same for all of
    them): skip it from its segment's residuals (or their forecast) or run it and extend the segment. The
    policy's forward calls `segments.begin()` before computing and `segments.finish(call, forecaster)` after."""
    if skip:
        return segments.skip(call, forecaster)
    return segments.run(call)
