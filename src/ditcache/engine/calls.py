"""The objects a policy receives for one model forward (`ForwardCall`) and one block call (`BlockCall`).

They are the hook points every method is built from:
- `ForwardCall.run()` computes the step; `reuse(sample)` returns a cached/corrected output instead;
  `run_trial(...)` runs an extra forward (e.g. on a downsampled latent) that the policy does not see.
- `BlockCall.run()` computes a block; `run_tokens(index, base)` computes some of its tokens;
  `skip(residuals)` returns `input + cached residual` instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..adapters import BlockListSpec, ModelAdapter
from .binding import BoundCall
from .context import ForwardInfo
from .stats import REUSED, ForwardRecord

T = TypeVar("T")

if TYPE_CHECKING:
    from .decisions import DecisionSync
    from .engine import Engine


def sample_of(output: Any) -> torch.Tensor:
    """The predicted tensor inside a transformer output (dataclass or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def shape_key(kwargs: Mapping[str, Any]) -> tuple:
    """The shapes of every tensor argument (tensors inside tuples and dicts too): what MACs depend on."""
    return tuple(
        (k, tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(tuple(t.shape) for t in iter_tensors(v)))
        for k, v in kwargs.items()
        if iter_tensors(v)
    )


@dataclasses.dataclass(frozen=True)
class CachePlacement:
    """Where cached tensors are kept: the config's `cache_dtype` / `cache_device` (None = as computed).

    `to_cache` moves a stored value there (floating tensors take `dtype`, every tensor `device`); `to_model`
    brings a cached value back to the dtype and device of the model's computation."""

    dtype: torch.dtype | None
    device: torch.device | None

    @classmethod
    def of(cls, config: Any) -> CachePlacement | None:
        dtype, device = getattr(config, "cache_dtype", None), getattr(config, "cache_device", None)
        if dtype is None and device is None:
            return None
        return cls(getattr(torch, dtype) if dtype else None, torch.device(device) if device else None)

    def to_cache(self, value: T) -> T:
        return map_tensors(value, lambda t: t.to(device=self.device or t.device, dtype=self._dtype(t, self.dtype)))

    def to_model(self, value: T, dtype: torch.dtype, device: torch.device) -> T:
        return map_tensors(value, lambda t: t.to(device=device, dtype=self._dtype(t, dtype)))

    @staticmethod
    def _dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
        # Only floating tensors change dtype: token indices and masks stay what they are.
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor inside it (dicts, tuples, lists; None and others unchanged)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


@torch.compiler.disable
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync for any number of tensors: never cache NaN / inf, it would be replayed into later steps.

    Checked through each tensor's sum (float32 or wider): a NaN or inf element makes the sum non-finite, and a
    sum is one read of the tensor where `isfinite(t).all()` writes a mask of its size first (17x slower on a
    CPU, 4% of a cached generation of ref-latte). A finite tensor whose sum overflows float32 (|sum| > 3e38)
    counts as non-finite: the branch recomputes, which is safe."""
    sums = [_finite_probe(t) for t in tensors if t.is_floating_point() or t.is_complex()]
    if not sums:
        return True
    return bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).all())  # caches may sit elsewhere


def _finite_probe(t: torch.Tensor) -> torch.Tensor:
    """A scalar that is finite iff every element of `t` is (up to overflow of the sum, see `all_finite`)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).to(torch.float64)


class ForwardCall:
    """One call of the model's forward, as a policy sees it.

    Verbs: `run()` computes the step (block hooks active; may be called more than once, each pass counted);
    `run_rows(rows)` computes part of the batch; `run_trial(**overrides)` runs an extra uncached forward the
    policy does not see and returns its predicted tensor; `reuse(sample)` returns a cached or corrected
    output instead of computing (the forward counts as reused); `wrap(sample)` builds the model's output
    type around a tensor without marking the forward reused (e.g. a computed output with a correction
    subtracted). Every tensor a policy puts into a cache goes through `store(value)`: the engine checks all
    of them (and the output) for NaN / inf once at the end of the forward (`finish(output)`, called by the
    engine, not by policies), and a non-finite forward resets the branch's state instead of being replayed
    later.

    Read: `info` (a `ForwardInfo`: generation, step, num_steps, timestep, branch), `arguments` (every model
    argument by name), `hidden_states`, `state` (this branch's policy state), `record` (the `ForwardRecord`
    stats will count).
    `engine` is the engine itself, for ditcache internals only: policies read the model through
    `Policy.model_view`.
    """

    def __init__(
        self,
        engine: Engine,
        original: Callable,
        bound: BoundCall,
        info: ForwardInfo,
        state: Any,
        record: ForwardRecord,
    ) -> None:
        self.engine, self.info, self.state, self.record = engine, info, state, record
        self._original, self._bound = original, bound
        self.arguments: Mapping[str, Any] = bound.arguments
        self._passes_started = False
        self._stored: list[torch.Tensor] = []
        self.placement = CachePlacement.of(engine.policy.config)

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.arguments[self.engine.adapter.hidden_states_arg]

    @property
    def adapter(self) -> ModelAdapter:
        """The adapter of the model this forward belongs to."""
        return self.engine.adapter

    @property
    def decisions(self) -> DecisionSync:
        """Where statistics of block tensors (a rank's shard under context parallelism) become one value that
        every rank shares (`engine/decisions.py`)."""
        return self.engine.decisions

    def count_extra_run(self, key: tuple, module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
        """Count a module the policy ran inside this forward besides the model's own blocks (a learned predictor,
        extra attention work) in stats and MACs: `module(**kwargs)` is flop-counted once per `key` (name the
        module and the shapes) when stats are asked for, and added to this forward's executed MACs."""
        self.record.token_runs.append(key)
        self.engine.remember_block_example(key, module, (), kwargs)

    def run(self, **replacements: Any) -> Any:
        """Compute this forward (blocks go through the policy's block hook when it has one), optionally with
        some arguments replaced by name (same shapes; calibration replays recorded inputs this way).

        A policy may call it more than once (e.g. a cheap variant with cached submodules first); every
        pass is counted in stats and MACs."""
        if replacements:
            return self._pass(*self._bound.replaced(replacements))
        return self._pass(self._bound.args, self._bound.kwargs)

    def _pass(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._passes_started:
            self.record.passes += 1
        self._passes_started = True
        start = time.perf_counter()
        output = self._original(*args, **kwargs)
        self.record.compute_seconds += time.perf_counter() - start
        if not self.engine.hooks_blocks:
            self.record.block_fraction = [1.0] * self.record.num_blocks
            self.record.full_block_runs = [n + 1 for n in self.record.full_block_runs]
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
            for name, value in self._bound.passed.items()
        }
        key = shape_key(kwargs)
        self.record.executed_key = key
        self.engine.remember_example(key, kwargs)
        return self._pass((), kwargs)

    def run_trial(self, **overrides: Any) -> torch.Tensor:
        """An extra uncached forward with some arguments replaced; counted in stats and MACs."""
        kwargs = {**self._bound.passed, **overrides, "return_dict": False}
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
        sample = self.fetch(sample)
        if self.arguments.get("return_dict", True):
            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    def store(self, value: T) -> T:
        """Mark `value` (a tensor, or a dict / tuple / list of tensors and None) as going into a cache and
        return what to keep: `value` itself, or its copy in the config's `cache_dtype` / `cache_device` when
        set. The engine checks everything stored during this forward once, at its end (the kept copies, so a
        float16 cache that overflows counts as non-finite)."""
        if self.placement is not None:
            value = self.placement.to_cache(value)
        self._stored.extend(iter_tensors(value))
        return value

    def fetch(self, value: T) -> T:
        """A cached value (what `store` returned) in the dtype and device of this forward's computation, to
        combine it with fresh tensors. Unchanged when no `cache_dtype` / `cache_device` is set; the verbs
        (`reuse`, `wrap`, `BlockCall.skip` / `replace` / `run_tokens` / `run_rows`, `SubmoduleCall.reuse`) fetch
        what they are given themselves."""
        if self.placement is None:
            return value
        latent = self.hidden_states
        return self.placement.to_model(value, latent.dtype, latent.device)

    def finish(self, output: Any) -> bool:
        """End of the forward: True when the output and every stored tensor are finite (one host sync)."""
        tensors = [*self._stored, sample_of(output)]
        self._stored = []
        return all_finite(tensors)


def iter_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in iter_tensors(item)]
    return []


@dataclasses.dataclass(frozen=True)
class BlockRef:
    spec: BlockListSpec
    index: int  # index inside its list
    position: int  # index over all hooked blocks, in execution order
    name: str  # e.g. "transformer_blocks.3"
    module: torch.nn.Module = dataclasses.field(compare=False, repr=False)


class BlockCall:
    """One call of a hooked transformer block inside a forward.

    `arguments` holds every block argument by name (bound to the block's forward signature once per class);
    `inputs()` the carried tensors the adapter names. Verbs: `run()`; `run_tokens(index, base)` computes only
    some image/video tokens and fills the rest from `base`; `run_rows(rows, base, index=None)` computes only
    some batch rows (and tokens); `skip(residuals)` = input + cached residual;
    `replace(values)` returns cached outputs; `passthrough()` hands the inputs on; `call_with(replacements)`
    calls the block's own forward with some arguments replaced, without any accounting.

    Read: `forward` (the enclosing `ForwardCall`; its `state` is this branch's policy state), `ref` (a
    `BlockRef`: the block list spec, `index` in its list, `position` over all hooked blocks in execution
    order, `name`, `module`), `info` (= `forward.info`), `num_tokens` (image/video tokens per sample).
    Helpers: `outputs_of(output)` names the block's outputs as a dict (the adapter's output names);
    `build_output(values)` is the inverse; `residuals(inputs, outputs)` = output - input per carried tensor
    (None stays None), what `skip` adds back.
    """

    def __init__(self, forward: ForwardCall, ref: BlockRef, original: Callable, args: tuple, kwargs: dict) -> None:
        self.forward, self.ref = forward, ref
        self._original = original
        self._bound = BoundCall(type(ref.module), args, kwargs)

    @property
    def arguments(self) -> Mapping[str, Any]:
        """Every block argument by name (defaults included), built on first use."""
        return self._bound.arguments

    @property
    def info(self) -> ForwardInfo:
        return self.forward.info

    @property
    def num_tokens(self) -> int:
        """Image/video tokens per sample in this block's token stream."""
        stream = self._bound.get(self.ref.spec.token_stream)
        return stream.shape[1] if isinstance(stream, torch.Tensor) and stream.ndim >= 2 else 1

    def inputs(self) -> dict[str, torch.Tensor]:
        return {name: self._bound.get(name) for name in self.ref.spec.inputs}

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
        output = self._original(*self._bound.args, **self._bound.kwargs)
        self._count(self.num_tokens)
        self.forward.record.full_block_runs[self.ref.position] += 1
        return output

    def run_tokens(self, index: torch.Tensor, base: torch.Tensor | dict[str, torch.Tensor | None]) -> Any:
        """Run the block on the tokens at `index` only and fill the others from `base`.

        `index`: int64 `(k,)` (same tokens in every row) or `(B, k)` (per row). Text / conditioning tokens
        always run; per-token arguments (rotary tables, per-token modulation; the adapter's `token_args`) are
        gathered with the same indices, so the kept tokens attend to the kept tokens only. `base`: the full
        token stream (B, N, C) to scatter the fresh tokens into (e.g. the cached output), or a dict of outputs
        by name whose other entries stand in for the outputs when no token runs. Returns the block's output.
        All tokens in order = `run()`; no tokens = `base`. Rows whose indices differ run as separate batches
        when an argument has no batch axis (Flux's rotary table), so rows never depend on each other.
        """
        from .token_run import run_token_subset

        self._check_token_subsets()
        return run_token_subset(self, index, self.forward.fetch(base))

    def run_rows(
        self,
        rows: torch.Tensor | None,
        base: torch.Tensor | dict[str, torch.Tensor | None],
        index: torch.Tensor | None = None,
        stream: torch.Tensor | None = None,
    ) -> Any:
        """Run the block on some of its batch rows only (and, with `index`, on some tokens of those rows); the
        other rows and tokens come from `base`.

        `rows`: int64 `(r,)`, strictly increasing block batch rows (None = every row); a Latte spatial block
        has one frame per row, a temporal block one patch position per row. `index`: None (all tokens), `(k,)`
        or `(r, k)` token indices of the kept rows, as in `run_tokens`. `stream`: an optional replacement of
        the token stream input (same shape; e.g. merged tokens). Every argument whose first size is the block's
        batch is sliced to the kept rows; MACs are measured at the executed shape. All rows, all tokens and no
        `stream` = `run()`; no rows = `base`.
        """
        from .row_run import run_row_subset

        if index is not None:
            self._check_token_subsets()
        return run_row_subset(self, rows, self.forward.fetch(base), index, stream)

    def _check_token_subsets(self) -> None:
        """A clear error where the adapter says this block list cannot run on a subset of its tokens."""
        reason = self.ref.spec.no_token_subsets
        if reason:
            engine = self.forward.engine
            raise TypeError(
                f"{type(engine.policy).__name__} runs blocks on token subsets, which the {engine.adapter.name} "
                f"adapter rules out for {self.ref.spec.attr}: {reason}"
            )

    def call_with(self, replacements: Mapping[str, Any]) -> tuple[Any, tuple, dict[str, Any]]:
        """Call the block's own forward with some arguments replaced (no accounting): (output, args, kwargs)."""
        args, kwargs = self._bound.replaced(replacements)
        return self._original(*args, **kwargs), args, kwargs

    def _count(self, tokens: int, fraction: float | None = None) -> None:
        record, position = self.forward.record, self.ref.position
        record.block_tokens[position] += tokens
        record.num_tokens = self.num_tokens
        record.block_fraction[position] = tokens / max(1, self.num_tokens) if fraction is None else fraction

    def skip(self, residuals: dict[str, torch.Tensor | None]) -> Any:
        """Skip the block: each output is its input plus the cached residual (None stays None)."""
        inputs, residuals = self.inputs(), self.forward.fetch(residuals)
        values = {}
        for name in self.ref.spec.outputs:
            residual = residuals.get(name)
            values[name] = None if residual is None else inputs[name] + residual
        self._count(0)
        return self.build_output(values)

    def replace(self, values: dict[str, torch.Tensor | None]) -> Any:
        """Skip the block and return `values` (e.g. its output cached at an earlier step) instead."""
        self._count(0)
        return self.build_output(self.forward.fetch(values))

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
        return self.forward.fetch(output)
