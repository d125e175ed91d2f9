"""The latent layout of a forward: its shape plus a signature of its position arguments.

Two latents with the same token count but another aspect ratio (Flux: 64x64 tokens vs 32x128) have equal
`hidden_states` shapes; only the position ids differ (`img_ids`, Qwen-Image's `img_shapes`, LTX's
`height` / `width`). The step tracker compares layouts, not shapes, so such a change is a new latent like a
shape change: a new generation at the same timestep, a clear error in the middle of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..adapters import ModelAdapter

Layout = tuple  # (hidden_states shape, (name, signature) of each position argument, ...)


class LayoutProbe:
    """Computes layouts for one session. Position-id tensors (the adapter's `unbatched_args`) are summarised by
    their per-axis minimum and maximum, one host sync for all of them; pipelines pass the same tensor at every
    step, so the summary is kept per tensor (identity and version) and a step costs no sync at all."""

    def __init__(self) -> None:
        self._tensors: tuple[torch.Tensor, ...] = ()  # held so that their ids stay unique while remembered
        self._versions: tuple[int | None, ...] = ()
        self._summary: tuple = ()

    def layout(self, adapter: ModelAdapter, arguments: Mapping[str, Any]) -> Layout:
        hidden_states = arguments[adapter.hidden_states_arg]
        names = [name for name in adapter.unbatched_args if isinstance(arguments.get(name), torch.Tensor)]
        tensors = tuple(arguments[name] for name in names)
        skip = (adapter.timestep_arg, adapter.hidden_states_arg)
        integers = tuple((name, _integers(value)) for name, value in arguments.items() if name not in skip)
        integers = tuple(item for item in integers if item[1] is not None)
        return (tuple(hidden_states.shape), *zip(names, self._summarise(tensors)), *integers)

    def _summarise(self, tensors: tuple[torch.Tensor, ...]) -> tuple:
        # Inference tensors (`torch.inference_mode`) keep no version counter: identity alone decides there.
        versions = tuple(None if t.is_inference() else t._version for t in tensors)
        same = len(tensors) == len(self._tensors) and all(a is b for a, b in zip(tensors, self._tensors))
        if same and versions == self._versions:
            return self._summary
        rows = [t.detach().reshape(-1, t.shape[-1]) if t.ndim else t.detach().reshape(1, 1) for t in tensors]
        extremes = [torch.cat([r.amin(0), r.amax(0)]).float() for r in rows if r.numel()]
        values = torch.cat(extremes).tolist() if extremes else []  # the one host sync
        summary, start = [], 0
        for tensor, row in zip(tensors, rows):
            width = 2 * row.shape[-1] if row.numel() else 0
            summary.append((tuple(tensor.shape), tuple(values[start : start + width])))
            start += width
        self._tensors, self._versions, self._summary = tensors, versions, tuple(summary)
        return self._summary


def _integers(value: Any) -> Any:
    """`value` as a hashable nest of ints (Qwen-Image's `img_shapes`, LTX's `height`), or None when it is
    anything else (tensors, floats, flags, dicts)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and value:
        items = [_integers(item) for item in value]
        return None if any(item is None for item in items) else tuple(items)
    return None
