"""`BlockCall.run_tokens`: a block run on a subset of its image/video tokens, the rest filled from a cache.

The block itself runs unchanged on shorter inputs: the token stream and every per-token argument the adapter
names (`BlockListSpec.token_args`) are gathered with the kept indices; text tokens are separate arguments (or
the `offset_arg` prefix of a per-token table) and always run. So the kept tokens attend to each other and to
the text, not to the skipped tokens: a token-level variant, not an attention-level one (see docs/ENGINE.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..adapters import TokenArg
from .calls import shape_key
from .tokens import check_index, gather_tokens, is_identity, scatter_tokens, token_arg_applies

if TYPE_CHECKING:
    from .calls import BlockCall

Outputs = dict[str, torch.Tensor | None]


def run_token_subset(call: BlockCall, index: torch.Tensor, base: torch.Tensor | Outputs) -> Any:
    spec = call.ref.spec
    stream = call.arguments[spec.token_stream]
    batch, num_tokens = stream.shape[0], stream.shape[1]
    check_index(index, batch, num_tokens)
    bases = full_bases(call, base)
    if is_identity(index, num_tokens):
        return call.run()
    kept = index.shape[-1]
    if kept == 0:
        inputs = call.inputs()
        call._count(0)
        return call.build_output({name: bases.get(name, inputs[name]) for name in spec.outputs})
    groups = _row_groups(call, index)
    if len(groups) == 1:
        values = _run_rows(call, None, groups[0][1], bases)
    else:
        parts = [(rows, _run_rows(call, rows, rows_index, bases)) for rows, rows_index in groups]
        values = _stitch_rows(parts)
    call._count(kept)
    return call.build_output(values)


def full_bases(call: BlockCall, base: torch.Tensor | Outputs) -> Outputs:
    """`base` as a dict of outputs by name, checked to hold the whole token stream (shared with `run_rows`)."""
    name = call.ref.spec.token_stream
    stream = call.arguments[name]
    bases = dict(base) if isinstance(base, dict) else {name: base}
    base_stream = bases.get(name)
    if not isinstance(base_stream, torch.Tensor) or base_stream.shape != stream.shape:
        raise ValueError(
            f"base must hold the full {name!r} of shape {tuple(stream.shape)}, "
            f"got {None if base_stream is None else tuple(base_stream.shape)}"
        )
    return bases


def _token_args(call: BlockCall) -> list[TokenArg]:
    spec = call.ref.spec
    stream = TokenArg(spec.token_stream, dim=1)
    return [arg for arg in (stream, *spec.token_args) if token_arg_applies(arg, call.arguments.get(arg.name))]


def _row_groups(call: BlockCall, index: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """[(rows, index)]: one shared-index group when possible; per-row indices over an argument without a batch
    axis split the batch into groups of rows with identical indices."""
    if index.ndim == 1:
        return [(None, index)]
    shared_arg = any(arg.batch == "shared" for arg in _token_args(call))
    if shared_arg and tokens_sharded(call):
        return [(torch.tensor([row]), index[row]) for row in range(index.shape[0])]
    unique, inverse = torch.unique(index, dim=0, return_inverse=True)
    if len(unique) == 1:
        return [(None, unique[0])]
    if not shared_arg:
        return [(None, index)]
    return [((inverse == g).nonzero().flatten(), unique[g]) for g in range(len(unique))]


def tokens_sharded(call: BlockCall) -> bool:
    """Whether the block's tokens are sharded over ranks (context parallelism). Every rank must then run the
    same sequence of block calls (each pairs its attention all-to-all with the other ranks'), so rows whose
    token subsets differ run one by one in row order, not grouped by what each rank's subsets share."""
    return call.forward.decisions.token_shards()[0] > 1


def _run_rows(call: BlockCall, rows: torch.Tensor | None, index: torch.Tensor, bases: Outputs) -> Outputs:
    """Run the block on `rows` of the batch (None = all) and the kept tokens; scatter into the bases."""
    spec = call.ref.spec
    batch = call.arguments[spec.token_stream].shape[0]
    token_args = {arg.name: arg for arg in _token_args(call)}
    replacements: dict[str, Any] = {}
    for name, value in call.arguments.items():
        arg = token_args.get(name)
        if rows is not None and (arg is None or arg.batch == "batched"):
            value = _take_rows(value, rows, batch)
        if arg is not None:
            offset = call.arguments[arg.offset_arg].shape[1] if arg.offset_arg else 0
            value = _map_tensors(
                value, lambda t, a=arg, o=offset: gather_tokens(t, index, a.dim, a.batch, o), arg.element
            )
        if value is not call.arguments[name]:
            replacements[name] = value
    output, args, kwargs = call.call_with(replacements)
    record = call.forward.record
    key = (call.ref.position, shape_key({**dict(enumerate(args)), **kwargs}))
    record.token_runs.append(key)
    call.forward.engine.remember_block_example(key, call.ref.module, args, kwargs)
    values = call.outputs_of(output)
    base_stream = bases[spec.token_stream]
    if rows is not None:
        base_stream = base_stream[rows]
    values[spec.token_stream] = scatter_tokens(base_stream, index, values[spec.token_stream])
    return values


def _take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, tuple) and value and all(isinstance(t, torch.Tensor) for t in value):
        return tuple(_take_rows(t, rows, batch) for t in value)
    return value


def _map_tensors(value: Any, fn: Any, element: int | None = None) -> Any:
    """`fn` on a tensor, or on each entry of a tuple / list (only entry `element` when given)."""
    if isinstance(value, (tuple, list)):
        return type(value)(fn(t) if element is None or i == element else t for i, t in enumerate(value))
    return fn(value)


def _stitch_rows(parts: list[tuple[torch.Tensor, Outputs]]) -> Outputs:
    """Put per-group outputs back into batch order."""
    order = torch.argsort(torch.cat([rows for rows, _ in parts]))
    names = parts[0][1].keys()
    values: Outputs = {}
    for name in names:
        pieces = [part[name] for _, part in parts]
        values[name] = None if pieces[0] is None else torch.cat(pieces).index_select(0, order.to(pieces[0].device))
    return values
