"""The objects a policy receives for one model forward (`ForwardCall`) and one block call (`BlockCall`).

They are the hook points every method is built from:
- `ForwardCall.run()` computes the step; `reuse(sample)` returns a cached/corrected output instead;
  `run_trial(...)` runs an extra forward (e.g. on a downsampled latent) that the policy does not see.
- `BlockCall.run()` computes a block; `skip(residuals)` returns `input + cached residual` instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..adapters import BlockListSpec
from .context import ForwardInfo
from .stats import REUSED, ForwardRecord

if TYPE_CHECKING:
    from .engine import Engine


def sample_of(output: Any) -> torch.Tensor:
    """The predicted tensor inside a transformer output (dataclass or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def shape_key(kwargs: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))


class ForwardCall:
    def __init__(
        self,
        engine: Engine,
        original: Callable,
        args: tuple,
        kwargs: dict[str, Any],
        info: ForwardInfo,
        state: Any,
        record: ForwardRecord,
    ) -> None:
        self.engine, self.info, self.state, self.record = engine, info, state, record
        self._original, self._args, self._kwargs = original, args, kwargs
        self.arguments = engine.bind_forward_args(args, kwargs)
        self._passes_started = False

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.arguments[self.engine.adapter.hidden_states_arg]

    def run(self) -> Any:
        """Compute this forward (blocks go through the policy's block hook when it has one).

        A policy may call it more than once (e.g. a cheap variant with cached submodules first); every
        pass is counted in stats and MACs."""
        return self._pass(self._args, self._kwargs)

    def _pass(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._passes_started:
            self.record.passes += 1
        self._passes_started = True
        start = time.perf_counter()
        output = self._original(*args, **kwargs)
        self.record.compute_seconds += time.perf_counter() - start
        if not self.engine.hooks_blocks:
            self.record.block_fraction = [1.0] * self.record.num_blocks
        return output

    def run_rows(self, rows: slice) -> Any:
        """Compute this forward for a slice of the batch rows only (e.g. the conditional half of a batched-CFG
        forward), through the block hooks like `run()`. Returns the model's output for those rows; MACs are
        counted at the smaller batch."""
        batch = self.hidden_states.shape[0]
        if not isinstance(rows, slice) or not 0 < len(range(*rows.indices(batch))) < batch:
            raise ValueError(f"rows must be a slice selecting part of the batch of {batch}, got {rows!r}")
        unbatched = set(self.engine.adapter.unbatched_args)
        kwargs = {
            name: value[rows]
            if isinstance(value, torch.Tensor) and name not in unbatched and value.ndim and value.shape[0] == batch
            else value
            for name, value in self.arguments.items()
        }
        key = shape_key(kwargs)
        self.record.executed_key = key
        self.engine.remember_example(key, kwargs)
        return self._pass((), kwargs)

    def run_trial(self, **overrides: Any) -> torch.Tensor:
        """An extra uncached forward with some arguments replaced; counted in stats and MACs."""
        kwargs = {**self.arguments, **overrides, "return_dict": False}
        start = time.perf_counter()
        with self.engine.bypassed():
            output = self._original(**kwargs)
        self.record.compute_seconds += time.perf_counter() - start
        key = shape_key(kwargs)
        self.record.trial_keys.append(key)
        self.engine.remember_example(key, kwargs)
        return sample_of(output)

    def reuse(self, sample: torch.Tensor) -> Any:
        """Return `sample` as this forward's output without computing it."""
        self.record.kind = REUSED
        return self.wrap(sample)

    def wrap(self, sample: torch.Tensor) -> Any:
        if self.arguments.get("return_dict", True):
            return Transformer2DModelOutput(sample=sample)
        return (sample,)


@dataclasses.dataclass(frozen=True)
class BlockRef:
    spec: BlockListSpec
    index: int  # index inside its list
    position: int  # index over all hooked blocks, in execution order
    name: str  # e.g. "transformer_blocks.3"
    module: torch.nn.Module = dataclasses.field(compare=False, repr=False)


class BlockCall:
    def __init__(self, forward: ForwardCall, ref: BlockRef, original: Callable, args: tuple, kwargs: dict) -> None:
        self.forward, self.ref = forward, ref
        self._original, self._args, self._kwargs = original, args, kwargs

    @property
    def info(self) -> ForwardInfo:
        return self.forward.info

    def inputs(self) -> dict[str, torch.Tensor]:
        values = {}
        for position, name in enumerate(self.ref.spec.inputs):
            values[name] = self._kwargs[name] if name in self._kwargs else self._args[position]
        return values

    def outputs_of(self, output: Any) -> dict[str, torch.Tensor | None]:
        names = self.ref.spec.outputs
        if len(names) == 1:
            return {names[0]: output}
        return dict(zip(names, output))

    def build_output(self, values: dict[str, torch.Tensor | None]) -> Any:
        names = self.ref.spec.outputs
        if len(names) == 1:
            return values[names[0]]
        return tuple(values[name] for name in names)

    def run(self) -> Any:
        output = self._original(*self._args, **self._kwargs)
        self.forward.record.block_fraction[self.ref.position] = 1.0
        return output

    def skip(self, residuals: dict[str, torch.Tensor | None]) -> Any:
        """Skip the block: each output is its input plus the cached residual (None stays None)."""
        inputs = self.inputs()
        values = {}
        for name in self.ref.spec.outputs:
            residual = residuals.get(name)
            values[name] = None if residual is None else inputs[name] + residual
        self.forward.record.block_fraction[self.ref.position] = 0.0
        return self.build_output(values)

    def replace(self, values: dict[str, torch.Tensor | None]) -> Any:
        """Skip the block and return `values` (e.g. its output cached at an earlier step) instead."""
        self.forward.record.block_fraction[self.ref.position] = 0.0
        return self.build_output(values)

    def passthrough(self) -> Any:
        """Skip the block and hand its inputs on unchanged (a later block's cached output takes over)."""
        return self.replace({name: self.inputs()[name] for name in self.ref.spec.outputs})

    @staticmethod
    def residuals(inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor | None]) -> dict:
        return {name: None if out is None else out - inputs[name] for name, out in outputs.items()}


@dataclasses.dataclass(frozen=True)
class SubmoduleRef:
    block: BlockRef
    role: str  # "attention" | "mlp"
    attr: str  # attribute name on the block, e.g. "attn1"

    @property
    def name(self) -> str:
        return f"{self.block.name}.{self.attr}"


class SubmoduleCall:
    """One call of a block's attention or MLP submodule; `reuse(output)` returns a cached output."""

    def __init__(self, forward: ForwardCall, ref: SubmoduleRef, original: Callable, args: tuple, kwargs: dict) -> None:
        self.forward, self.ref = forward, ref
        self._original, self._args, self._kwargs = original, args, kwargs

    def run(self) -> Any:
        return self._original(*self._args, **self._kwargs)

    def reuse(self, output: Any) -> Any:
        self.forward.record.skipped_submodules.append(self.ref.name)
        return output
