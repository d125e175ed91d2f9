"""TokenCache's block runs, shared by the policy (`tokencache.py`) and its training (`calibration/tokencache.py`):
a block run on every token storing its per-token update, a run on the selected tokens with the others taking
input + cached update (Eq. 6), and the predictor's scores."""

from __future__ import annotations

from typing import Any

import torch

from ..engine.calls import BlockCall, shape_key
from .tokencache_attention import attend_to_all_tokens


def run_and_store_update(call: BlockCall) -> tuple[Any, torch.Tensor]:
    """Run the block on every token: (output, its per-token update output - input, stored)."""
    name = call.ref.spec.token_stream
    stream = call.arguments[name]
    output = call.run()
    return output, call.forward.store(call.outputs_of(output)[name] - stream)


def run_cached_block(
    call: BlockCall, index: torch.Tensor, update: torch.Tensor, full_context: bool = False
) -> tuple[Any, torch.Tensor]:
    """Eq. 6 with hard decisions: the tokens at `index` (rows, k) run, the others are input + cached update;
    with `full_context` the running tokens attend to every token (`attend_to_all_tokens`). Returns (output,
    the update with the fresh tokens' updates written in, stored)."""
    name = call.ref.spec.token_stream
    stream = call.arguments[name]
    if index.shape[-1] == stream.shape[1]:
        return run_and_store_update(call)
    if full_context and index.shape[-1] > 0:
        with attend_to_all_tokens(call, index):
            output = call.run_tokens(index, stream + update)
    else:
        output = call.run_tokens(index, stream + update)
    if index.shape[-1] == 0:
        return output, call.forward.store(update)
    fresh = call.outputs_of(output)[name]
    rows_index = index if index.ndim == 2 else index.expand(stream.shape[0], -1)
    gather = rows_index.unsqueeze(-1).expand(-1, -1, stream.shape[-1])
    new = update.scatter(1, gather, fresh.gather(1, gather) - stream.gather(1, gather))
    return output, call.forward.store(new)


def subset_capable(ref: Any) -> bool:
    """The adapter allows this block to run on a token subset (`BlockListSpec.no_token_subsets` is empty)."""
    return not getattr(ref.spec, "no_token_subsets", "")


def predict_scores(call: BlockCall, predictor: torch.nn.Module) -> torch.Tensor:
    """The predictor's (rows, tokens, blocks) scores from block 0's own arguments; its MACs are counted like a
    token-subset block run (a flop-counted run of the predictor at that shape)."""
    arguments = dict(call.arguments)
    scores = predictor(**arguments)
    call.forward.count_extra_run(("tokencache-predictor", shape_key(arguments)), predictor, arguments)
    return scores


def fresh_tokens(previous: torch.Tensor | None, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(rows, tokens) bool: the tokens updated at this P-step (`index`, (rows, k) or shared (k,)) or before."""
    rows, tokens = shape
    mask = torch.zeros(rows, tokens, dtype=torch.bool, device=index.device)
    if index.ndim == 1:
        mask[:, index] = True
    else:
        mask.scatter_(1, index, True)
    return mask if previous is None else mask | previous.to(mask.device)
