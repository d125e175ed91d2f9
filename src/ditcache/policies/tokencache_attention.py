"""TokenCache's `attention="all"`: at a P-step the updated tokens attend to *every* token of the block's input
(Eq. 6 writes the update as f(x^{l-1}) of the whole token set), not only to each other as a plain token-subset
run does. The block still runs on the updated tokens only (`BlockCall.run_tokens`); while it runs, its
self-attention takes the queries from those tokens and the keys / values from the adaLN-modulated input of all
tokens (`ModelAdapter.modulated_input`), which gives exactly the full block's output on the updated tokens.

- DiT (`BasicTransformerBlock`, adaLN-Zero): `attn1` computes keys / values from `encoder_hidden_states` when
  given, so a forward pre-hook passes the full modulated input there.
- Wan (`WanTransformerBlock`): rotary positions differ for queries and keys, so `attn1`'s processor is swapped
  for the duration of the run by one that rotates the queries with the subset's positions and the keys with all.

Nothing stays on the model: the hook is removed and the processor restored when the run ends. The extra work
(keys / values of the other tokens, attention over them) is counted in MACs like a token-subset run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..engine.calls import shape_key

if TYPE_CHECKING:
    from ..engine.calls import BlockCall

WAN_PROCESSORS = ("WanAttnProcessor", "WanAttnProcessor2_0")


def full_context_kind(view: Any) -> str | None:
    """ "dit" / "wan" where every block supports attention over all tokens, else None."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [ref.module for ref in view.blocks]
    if view.adapter.name == "dit" and all(
        isinstance(b, BasicTransformerBlock) and not b.only_cross_attention for b in blocks
    ):
        return "dit"
    if view.adapter.name == "wan" and all(
        type(getattr(getattr(b, "attn1", None), "processor", None)).__name__ in WAN_PROCESSORS
        and getattr(b.attn1, "add_k_proj", None) is None
        and not getattr(b.attn1, "fused_projections", False)
        for b in blocks
    ):
        return "wan"
    return None


def supports_full_context(view: Any) -> bool:
    """attention="all" works on DiT's adaLN-Zero `BasicTransformerBlock`s and Wan's blocks (see the module)."""
    return full_context_kind(view) is not None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding (`WanAttnProcessor`), on (B, S, heads, dim)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _WanFullContext:
    """A `WanAttnProcessor` stand-in for self-attention: queries from the running tokens (their rotary
    positions), keys / values from `context` (every token, all positions)."""

    def __init__(self, context: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], replaced: Any) -> None:
        self.context, self.rotary = context, rotary
        # under context parallelism, attend like the replaced processor: over every rank's tokens (Ulysses)
        self.parallel = getattr(replaced, "_parallel_config", None)
        self.backend = getattr(replaced, "_attention_backend", None)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, rotary_emb: Any = None) -> torch.Tensor:  # fmt: skip
        context = self.context.to(hidden_states.dtype)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *self.rotary)
        if self.parallel is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            ).transpose(1, 2)
        else:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(query, key, value, backend=self.backend, parallel_config=self.parallel)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class _ContextCost(torch.nn.Module):
    """What attending to every token adds to a token-subset run: keys / values of the other tokens and the
    attention of the running queries over them (MACs only: measured by the flop counter, never used)."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, query: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        attn = self.attention
        key, value = attn.to_k(others), attn.to_v(others)
        split = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        return torch.nn.functional.scaled_dot_product_attention(split(query), split(key), split(value))


@contextlib.contextmanager
def attend_to_all_tokens(call: BlockCall, index: torch.Tensor) -> Iterator[None]:
    """While a token-subset run of this block is inside, its self-attention takes the queries from the running
    tokens and the keys / values from every token (see the module); the extra work is counted in MACs."""
    block = call.ref.module
    adapter = call.forward.adapter
    context = adapter.modulated_input(block, call.arguments)
    attention = block.attn1
    if adapter.name == "wan":
        saved = attention.processor
        attention.processor = _WanFullContext(context, call.arguments["rotary_emb"], saved)
        try:
            yield
        finally:
            attention.processor = saved
    else:

        def inject(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "encoder_hidden_states": context}

        handle = attention.register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
    rows, kept, others = context.shape[0], index.shape[-1], context.shape[1] - index.shape[-1]
    dtype = attention.to_k.weight.dtype  # Wan's modulated input is float32 even in a bfloat16 model
    example = {
        "query": torch.empty(rows, kept, context.shape[-1], dtype=dtype, device=context.device),
        "others": torch.empty(rows, others, context.shape[-1], dtype=dtype, device=context.device),
    }
    key = ("tokencache-context", call.ref.position, shape_key(example))
    call.forward.count_extra_run(key, _ContextCost(attention), example)
