"""Model adapters: flat data that tells the engine where a diffusers transformer keeps its blocks.

An adapter is data, not behaviour: which attributes hold block lists, which tensors a block carries from
input to output (so a skipped block can be replaced by `input + cached residual`), whether a block mixes
space or time, and how to read the latent grid so tokens can be mapped back to (frame, row, column).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

BLOCK_KINDS = ("joint", "spatial", "temporal", "spatiotemporal")


@dataclasses.dataclass(frozen=True)
class LatentGrid:
    """Token grid after patchify: `frames * height * width` image/video tokens per sample."""

    frames: int
    height: int
    width: int
    patch: tuple[int, int, int] = (1, 1, 1)

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclasses.dataclass(frozen=True)
class BlockListSpec:
    """One `nn.ModuleList` of transformer blocks.

    `inputs` are the tensors a block carries through (their positional order in `forward`), `outputs` the
    names of what it returns, in order; a single name means the block returns a bare tensor. A block whose
    output for a name is `None` (SD3's last joint block drops the text stream) stays `None` when skipped.
    """

    attr: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kind: str = "spatiotemporal"
    # Submodules whose outputs are "attention" and "MLP" for policies that reuse them inside a block.
    attention: tuple[str, ...] = ("attn",)
    mlp: tuple[str, ...] = ("ff",)

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"kind must be one of {BLOCK_KINDS}, got {self.kind!r}")
        missing = set(self.outputs) - set(self.inputs)
        if missing:
            raise ValueError(f"outputs {sorted(missing)} of block list {self.attr!r} are not among its inputs")


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """Everything the engine needs to know about one diffusers transformer class."""

    name: str
    model_class: type[torch.nn.Module]
    block_lists: tuple[BlockListSpec, ...]
    # Layout of the latent passed as `hidden_states` to the model: "BNC" (packed tokens, Flux),
    # "BCHW" (SD3) or "BCFHW" (Wan). Trial forwards on downsampled latents need it.
    latent_layout: str
    # Reads the post-patch token grid from the model and the forward kwargs.
    grid: Callable[[torch.nn.Module, dict[str, Any]], LatentGrid]
    # Extra forward kwargs a forward on a smaller latent grid needs (Flux: position ids of the new grid).
    resized_kwargs: Callable[[dict[str, Any], LatentGrid], dict[str, Any]] | None = None
    # Patch size (frames, height, width) the latent must stay divisible by after downsampling.
    patch: Callable[[torch.nn.Module], tuple[int, int, int]] = lambda model: (1, 1, 1)
    # (first block, its args, its kwargs) -> the timestep-modulated input of that block: the cheap
    # feature TeaCache-style criteria watch.
    modulated_input: Callable[[torch.nn.Module, tuple, dict[str, Any]], torch.Tensor] | None = None
    hidden_states_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    # Positional order of the model's forward arguments we need to find when passed positionally.
    forward_args: tuple[str, ...] = ("hidden_states",)
    # Tensor arguments without a batch dimension (Flux's position ids): a forward on a subset of the batch
    # rows (`ForwardCall.run_rows`) passes them unchanged even when their first size equals the batch size.
    unbatched_args: tuple[str, ...] = ()
    notes: str = ""


def adaln_zero_modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """Blocks whose `norm1` is an AdaLayerNormZero called as `norm1(hidden_states, emb=temb)` (Flux, SD3)."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    temb = kwargs["temb"] if "temb" in kwargs else args[2]
    return block.norm1(hidden_states, emb=temb)[0]
