"""OmniCache layered cache: offline (layer, step) profile, greedy schedule (Alg. 1) and its refinement (Alg. 2/3).

Profiling (`calibrate`): one uncached generation through the engine's hooks. At every step after the first, and
for every block l, an extra pass of the same forward skips block l with its residual cached at the previous
step (everything else computed); the *loss* of cell (l, t) is the relative L2 change of the model output it
causes (teacher-forced, averaged over CFG branches: the paper measures FID per cell, which would need
L x T full generations). The *latency* of a cell is block l's MACs (deterministic, from `torch.utils.flop_counter`;
measured block seconds are stored for information only). w(l, t) = loss / latency.

Schedule (`greedy_schedule`): cells in ascending w (cheap to reuse for their cost first; ties by step, then
layer) are added while the refined schedule saves less than 1 - 1/speedup of the generation's MACs.

Refinement (`refine`) on the compute graph (each block's parent is the block executed before it):
1. no cell at steps before the first computed step (nothing is cached yet) or on a block of zero cost;
2. a layer may reuse its cached residual at most `interval - 1` steps in a row (one computed step in every
   `interval`, the paper's caching interval N): the cell that would make a longer run is out of interval;
3. an out-of-interval cell is moved to the earliest later step at which its parent is cached and where the
   layer itself is free and stays within the interval ("align cache steps with parent dependencies"), so moved
   reuse joins a span the parent already skips; a cell with no such step (or no parent) is dropped.
Layers are processed in topological order (parents final first), steps in increasing order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..config import PolicyConfig
from ..engine.calls import BlockCall, ForwardCall, sample_of
from ..engine.macs import measure_costs
from ..engine.state import BranchState
from ..registry import register_policy
from .profiles import Profile, ProfileMismatchError, model_fingerprint
from .record import CalibrationRun, RecordingPolicy, record

METHOD = "omnicache-layered"
DEFAULT_INTERVAL = 5  # the paper's N for SD3
DEFAULT_SPEEDUPS = (2.0, 3.0)
Cell = tuple[int, int]  # (block position, step)


# ---------------------------------------------------------------------------------------------- scheduling
def chain_parents(num_blocks: int) -> list[list[int]]:
    """The compute graph of a sequential stack: block p's parent is block p - 1."""
    return [[p - 1] if p else [] for p in range(num_blocks)]


def _topological(parents: Sequence[Sequence[int]]) -> list[int]:
    order, seen = [], set()

    def visit(node: int, stack: tuple[int, ...] = ()) -> None:
        if node in seen:
            return
        if node in stack:
            raise ValueError(f"the compute graph has a cycle through block {node}")
        for parent in parents[node]:
            visit(parent, (*stack, node))
        seen.add(node)
        order.append(node)

    for node in range(len(parents)):
        visit(node)
    return order


def _run_before(steps: set[int], t: int) -> int:
    """How many steps directly before t are in `steps` (a run of consecutive cached steps)."""
    run = 0
    while t - 1 - run in steps:
        run += 1
    return run


def _fits(steps: set[int], t: int, interval: int) -> bool:
    """Adding step t keeps every run of consecutive cached steps at most interval - 1 long."""
    before, after = _run_before(steps, t), 0
    while t + 1 + after in steps:
        after += 1
    return before + 1 + after <= interval - 1


def refine(
    cells: Iterable[Cell],
    parents: Sequence[Sequence[int]],
    num_steps: int,
    interval: int = DEFAULT_INTERVAL,
    latency: Sequence[float] | None = None,
    first_step: int = 1,
) -> set[Cell]:
    """Alg. 2/3: the schedule `cells` made consistent with the compute graph (see the module docstring)."""
    wanted: dict[int, list[int]] = {}
    for layer, step in cells:
        if step >= first_step and step < num_steps and (latency is None or latency[layer] > 0):
            wanted.setdefault(layer, []).append(step)
    final: dict[int, set[int]] = {}
    for layer in _topological(parents):
        kept: set[int] = set()
        moved: list[int] = []
        for step in sorted(set(wanted.get(layer, []))):
            if _fits(kept, step, interval):
                kept.add(step)
            else:
                moved.append(step)
        parent_steps = set.intersection(*(final.get(p, set()) for p in parents[layer])) if parents[layer] else set()
        for step in moved:
            target = next(
                (s for s in sorted(parent_steps) if s > step and s not in kept and _fits(kept, s, interval)), None
            )
            if target is not None:
                kept.add(target)
        final[layer] = kept
    return {(layer, step) for layer, steps in final.items() for step in steps}


def saving(cells: Iterable[Cell], latency: Sequence[float], total: float) -> float:
    """Share of the generation's cost the schedule saves."""
    return sum(latency[layer] for layer, _ in cells) / total


def greedy_schedule(
    loss: Sequence[Sequence[float]],
    latency: Sequence[float],
    total: float,
    speedup: float,
    parents: Sequence[Sequence[int]] | None = None,
    interval: int = DEFAULT_INTERVAL,
) -> set[Cell]:
    """Alg. 1 + refinement: `loss[l][t]` per cell, `latency[l]` per block (the cost one cell saves), `total` the
    cost of the whole generation; cells by ascending loss / latency until 1 - 1/speedup of `total` is saved."""
    num_blocks, num_steps = len(loss), len(loss[0]) if loss else 0
    parents = chain_parents(num_blocks) if parents is None else parents
    target = 1.0 - 1.0 / speedup
    weight = {
        (layer, step): loss[layer][step] / latency[layer]
        for layer in range(num_blocks)
        for step in range(1, num_steps)
        if latency[layer] > 0
    }
    order = sorted(weight, key=lambda cell: (weight[cell], cell[1], cell[0]))
    chosen: list[Cell] = []
    schedule: set[Cell] = set()
    for cell in order:
        if saving(schedule, latency, total) >= target:
            break
        chosen.append(cell)
        schedule = refine(chosen, parents, num_steps, interval, latency)
    return schedule


def schedule_from_profile(data: dict[str, Any], speedup: float, num_blocks: int) -> set[Cell]:
    """The refined greedy schedule of a layered profile at `speedup` (validated against the model's blocks)."""
    loss, latency = data.get("loss"), data.get("block_macs")
    if (
        not isinstance(loss, list)
        or not isinstance(latency, list)
        or len(loss) != num_blocks
        or len(latency) != num_blocks
    ):
        raise ProfileMismatchError(
            f"layered profile must hold loss and block_macs for the model's {num_blocks} blocks; recalibrate it"
        )
    total = float(data["forward_macs"]) * len(loss[0])
    return greedy_schedule(
        loss, latency, total, speedup, data.get("parents"), int(data.get("interval", DEFAULT_INTERVAL))
    )


# ---------------------------------------------------------------------------------------------- profiling
@dataclasses.dataclass(frozen=True)
class LayeredCalibrationConfig(PolicyConfig):
    """Internal: compute every step; before each real pass, one pass per block with that block skipped."""


@dataclasses.dataclass
class LayeredCalibrationState(BranchState):
    residuals: dict[int, Any] = dataclasses.field(default_factory=dict)
    skip: int | None = None  # the block skipped in the running perturbation pass
    storing: bool = True  # the real pass: cache residuals, time blocks


@register_policy(LayeredCalibrationConfig)
class LayeredCalibrationPolicy(RecordingPolicy):
    branch_state = LayeredCalibrationState
    uses_block_hooks = True

    def __init__(self, config: PolicyConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.loss: dict[tuple[str, int, int], float] = {}  # (branch, step, position) -> relative output change
        self.example: dict[str, Any] | None = None
        self.block_seconds: dict[int, float] = {}

    def compute(self, call: ForwardCall) -> Any:
        state: LayeredCalibrationState = call.state
        if self.example is None:
            self.example = {k: v for k, v in call.arguments.items()}
        perturbed = {}
        if len(state.residuals) == self.model_view.num_blocks:
            state.storing = False
            for ref in self.model_view.blocks:
                state.skip = ref.position
                perturbed[ref.position] = sample_of(call.run()).float()
        state.skip, state.storing = None, True
        output = call.run()
        reference = sample_of(output).float()
        scale = reference.norm().clamp_min(1e-12)
        for position, out in perturbed.items():
            self.loss[(call.info.branch, call.info.step, position)] = float((out - reference).norm() / scale)
        return output

    def block(self, call: BlockCall) -> Any:
        state: LayeredCalibrationState = call.forward.state
        position = call.ref.position
        if state.skip == position:
            return call.skip(state.residuals[position])
        if not state.storing:
            return call.run()
        inputs = call.inputs()
        start = time.perf_counter()
        output = call.run()
        self.block_seconds[position] = self.block_seconds.get(position, 0.0) + time.perf_counter() - start
        state.residuals[position] = call.forward.store(call.residuals(inputs, call.outputs_of(output)))
        return output


def calibrate(
    model: torch.nn.Module,
    generation: CalibrationRun,
    model_name: str | None = None,
    interval: int = DEFAULT_INTERVAL,
    speedups: Sequence[float] = DEFAULT_SPEEDUPS,
) -> Profile:
    """Layered profile of `model` from one generation: per-cell loss, per-block MACs, schedules at `speedups`."""
    policy, _ = record(model, LayeredCalibrationConfig(), generation)
    view, steps = policy.model_view, generation.num_steps
    costs = measure_costs(
        lambda: model(**{**policy.example, "return_dict": False}), model, [ref.name for ref in view.blocks]
    )
    branches = sorted({branch for branch, _, _ in policy.loss})
    loss = [
        [
            sum(policy.loss.get((b, step, ref.position), 0.0) for b in branches) / max(1, len(branches))
            for step in range(steps)
        ]
        for ref in view.blocks
    ]
    data = {
        **generation.meta,
        "guidance": generation.guidance,
        "blocks": list(view.block_names),
        "loss": loss,
        "loss_metric": "relative L2 change of the model output when the block reuses its previous-step residual",
        "block_macs": list(costs.blocks),
        "forward_macs": costs.total,
        "latency": "macs",
        "block_seconds": [policy.block_seconds.get(ref.position, 0.0) / steps for ref in view.blocks],
        "interval": interval,
        "parents": chain_parents(view.num_blocks),
    }
    data["schedules"] = schedules(data, speedups, view.num_blocks)
    return Profile(METHOD, model_name or type(model).__name__, model_fingerprint(model), steps, data)


def schedules(data: dict[str, Any], speedups: Sequence[float], num_blocks: int) -> dict[str, Any]:
    """For reading a profile: the refined schedule at each speedup, as sorted [position, step] pairs, and the
    MACs saving it reaches."""
    out = {}
    steps = len(data["loss"][0])
    for speedup in speedups:
        cells = sorted(schedule_from_profile(data, speedup, num_blocks))
        share = saving(cells, data["block_macs"], float(data["forward_macs"]) * steps)
        out[f"{speedup:g}"] = {"cells": [list(c) for c in cells], "saving": share, "macs_speedup": 1 / (1 - share)}
    return out
