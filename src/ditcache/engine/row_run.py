"""`BlockCall.run_rows`: a block run on a subset of its batch rows (and optionally of their tokens).

Some block lists put something other than a sample in a batch row: a Latte spatial block sees one *frame* per
row ((B * F, H * W, C)) and a temporal block one *patch position* per row ((B * H * W, F, C)). Skipping whole
frames in spatial layers or whole positions in temporal layers (OmniCache's Frame / Block Cache) therefore skips
rows of that block call. The block runs unchanged on the kept rows (every argument whose first size is the
block's batch is sliced the same way, as `ForwardCall.run_rows` does for the model), optionally on a token subset
of those rows too (as `run_tokens`), and the result is scattered into `base`.

Rows never depend on each other: a block's rows are independent computations (attention is per row), the row
selection is plain indexing, and rows whose token indices differ run as separate batches when an argument has no
batch axis (Flux's rotary table). MACs are measured at the executed shape like every token-subset run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .calls import shape_key
from .token_run import _map_tensors, _take_rows, _token_args, full_bases, tokens_sharded
from .tokens import check_index, gather_tokens

if TYPE_CHECKING:
    from .calls import BlockCall

Outputs = dict[str, torch.Tensor | None]


def check_rows(rows: torch.Tensor, batch: int) -> None:
    """A clear error for a row selection `run_rows` cannot use."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.long or rows.ndim != 1:
        raise ValueError(
            f"rows must be a 1-D int64 tensor of block batch rows, got {type(rows).__name__} "
            f"{getattr(rows, 'dtype', '')} {tuple(getattr(rows, 'shape', ()))}"
        )
    if rows.numel() and not bool(((rows >= 0) & (rows < batch)).all()):
        raise ValueError(f"rows must lie in [0, {batch})")
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("rows must be strictly increasing (each row once, in batch order)")


def run_row_subset(
    call: BlockCall,
    rows: torch.Tensor | None,
    base: torch.Tensor | Outputs,
    index: torch.Tensor | None = None,
    stream: torch.Tensor | None = None,
) -> Any:
    spec = call.ref.spec
    x = call.arguments[spec.token_stream]
    batch, num_tokens = x.shape[0], x.shape[1]
    rows = torch.arange(batch) if rows is None else rows
    check_rows(rows, batch)
    if index is not None:
        check_index(index, len(rows), num_tokens)
    bases = full_bases(call, base)
    if stream is not None and (not isinstance(stream, torch.Tensor) or stream.shape != x.shape):
        raise ValueError(f"stream must replace {spec.token_stream!r} with the same shape {tuple(x.shape)}")
    kept_rows, kept_tokens = len(rows), num_tokens if index is None else index.shape[-1]
    if stream is None and kept_rows == batch and index is None:
        return call.run()
    inputs = call.inputs()
    if kept_rows == 0 or kept_tokens == 0:
        call._count(0)
        return call.build_output({name: bases.get(name, inputs[name]) for name in spec.outputs})
    all_rows = kept_rows == batch
    parts = [
        (group_rows, _run_part(call, None if all_rows and group is None else group_rows, group_index, stream))
        for group, group_rows, group_index in _groups(call, rows, index)
    ]
    values = {}
    for name in spec.outputs:
        full = bases.get(name, inputs[name])
        pieces = [part[name] for _, part in parts]
        if full is None or pieces[0] is None:
            values[name] = None
            continue
        out = full.clone()  # the only copy: fresh rows / tokens are written into it in place
        for (group_rows, _), piece in zip(parts, pieces):
            device_rows = group_rows.to(out.device)
            if name == spec.token_stream and index is not None:
                tokens = _piece_index(index, rows, group_rows).to(out.device)
                tokens = tokens.expand(len(device_rows), -1) if tokens.ndim == 1 else tokens
                out.index_put_((device_rows[:, None].expand_as(tokens), tokens), piece.to(out.dtype))
            else:
                out.index_copy_(0, device_rows, piece.to(out.dtype))
        values[name] = out
    fraction = kept_rows * kept_tokens / (batch * num_tokens)
    call._count(round(kept_rows * kept_tokens / batch), fraction)
    return call.build_output(values)


def _groups(
    call: BlockCall, rows: torch.Tensor, index: torch.Tensor | None
) -> list[tuple[int | None, torch.Tensor, torch.Tensor | None]]:
    """[(group id or None, block rows, index for those rows)]: one run unless per-row indices meet an argument
    without a batch axis, where rows with identical indices run together."""
    if index is None or index.ndim == 1:
        return [(None, rows, index)]
    if all(arg.batch != "shared" for arg in _token_args(call)):
        return [(None, rows, index)]
    if tokens_sharded(call):  # the same block calls on every rank (`token_run.tokens_sharded`)
        return [(i, rows[i : i + 1], index[i]) for i in range(len(rows))]
    unique, inverse = torch.unique(index, dim=0, return_inverse=True)
    return [(g, rows[inverse == g], unique[g]) for g in range(len(unique))]


def _piece_index(index: torch.Tensor, rows: torch.Tensor, group_rows: torch.Tensor) -> torch.Tensor:
    """The token index of `group_rows` (a subset of `rows`): shared, or the rows' own lines of a per-row index."""
    if index.ndim == 1:
        return index
    position = torch.searchsorted(rows, group_rows)
    return index.index_select(0, position)


def _run_part(
    call: BlockCall, rows: torch.Tensor | None, index: torch.Tensor | None, stream: torch.Tensor | None
) -> Outputs:
    """The block on `rows` (None = all) and the tokens at `index` (None = all): its raw outputs for those rows
    (the token stream holds only the kept tokens)."""
    spec = call.ref.spec
    batch = call.arguments[spec.token_stream].shape[0]
    token_args = {arg.name: arg for arg in _token_args(call)} if index is not None else {}
    replacements: dict[str, Any] = {}
    for name, value in call.arguments.items():
        original = value
        if name == spec.token_stream and stream is not None:
            value = stream
        arg = token_args.get(name)
        if rows is not None and (arg is None or arg.batch == "batched"):
            value = _take_rows(value, rows, batch)
        if arg is not None:
            offset = call.arguments[arg.offset_arg].shape[1] if arg.offset_arg else 0
            value = _map_tensors(
                value, lambda t, a=arg, o=offset: gather_tokens(t, index, a.dim, a.batch, o), arg.element
            )
        if value is not original:
            replacements[name] = value
    output, args, kwargs = call.call_with(replacements)
    key = (call.ref.position, shape_key({**dict(enumerate(args)), **kwargs}))
    call.forward.record.token_runs.append(key)
    call.forward.engine.remember_block_example(key, call.ref.module, args, kwargs)
    return call.outputs_of(output)
