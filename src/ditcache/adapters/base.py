"""Model adapters: flat data that tells the engine where a diffusers transformer keeps its blocks.

An adapter is data, not behaviour: which attributes hold block lists, which tensors a block carries from
input to output (so a skipped block can be replaced by `input + cached residual`), whether a block mixes
space or time, and how to read the latent grid so tokens can be mapped back to (frame, row, column).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

BLOCK_KINDS = ("joint", "spatial", "temporal", "spatiotemporal")
# Order of the image/video tokens in a block's token stream, slowest axis first: "fhw" = frame-major, then row,
# then column (Flux's packed latents, Wan's flattened patches); "hwf" = all frames of one position together.
TOKEN_ORDERS = ("fhw", "hwf")
TOKEN_BATCH_MODES = ("batched", "broadcast", "shared")
# How the model calls its block lists: "sequential" (every block of the first list, then the next list: Flux's
# joint then single blocks) or "interleaved" (block i of each list in turn: Latte's spatial i, temporal i).
EXECUTION_ORDERS = ("sequential", "interleaved")


@dataclasses.dataclass(frozen=True)
class LatentGrid:
    """Token grid after patchify: `frames * height * width` image/video tokens per sample, in `order`."""

    frames: int
    height: int
    width: int
    patch: tuple[int, int, int] = (1, 1, 1)
    order: str = "fhw"

    def __post_init__(self) -> None:
        if self.order not in TOKEN_ORDERS:
            raise ValueError(f"order must be one of {TOKEN_ORDERS}, got {self.order!r}")

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclasses.dataclass(frozen=True)
class TokenArg:
    """A block argument with one entry per token, gathered with the same indices as the token stream when a
    block runs on a subset of its tokens (`BlockCall.run_tokens`).

    `batch` says how its batch axis looks: "batched" (dim 0 is the batch, e.g. Wan 2.2's per-token temb),
    "broadcast" (a size-1 batch axis, e.g. Wan's rotary table (1, S, 1, D)) or "shared" (no batch axis, e.g.
    Flux's rotary table (S, D)). `offset_arg` names the argument whose token count (its dim 1) comes first in
    this tensor: Flux's rotary table covers [text; image] tokens, so the image tokens start after the text's
    and the text entries are always kept. `ndim` restricts the gathering to tensors of that rank (Wan's temb
    is per token only in its 4-D form). A tuple value (a (cos, sin) pair) is gathered element by element.
    """

    name: str
    dim: int
    batch: str = "batched"
    offset_arg: str | None = None
    ndim: int | None = None
    # A tuple value whose entries are not all per token: only this entry is gathered (Qwen-Image's rotary pair
    # is (image table, text table)); None gathers every entry.
    element: int | None = None

    def __post_init__(self) -> None:
        if self.batch not in TOKEN_BATCH_MODES:
            raise ValueError(f"batch must be one of {TOKEN_BATCH_MODES}, got {self.batch!r}")


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
    # The carried tensor that holds the image/video tokens (B, N, C); text streams are never subset.
    token_stream: str = "hidden_states"
    # Other arguments with a token axis (rotary tables, per-token modulation).
    token_args: tuple[TokenArg, ...] = ()
    # Why a block of this list cannot run on a subset of its tokens ("" = it can): e.g. Sana's feed-forward
    # is a 3x3 convolution over the full grid. `BlockCall.run_tokens` / `run_rows(index=...)` raise with it.
    no_token_subsets: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"kind must be one of {BLOCK_KINDS}, got {self.kind!r}")
        missing = set(self.outputs) - set(self.inputs)
        if missing:
            raise ValueError(f"outputs {sorted(missing)} of block list {self.attr!r} are not among its inputs")


@dataclasses.dataclass(frozen=True)
class PositionTable:
    """A submodule that rebuilds the rotary (cos, sin) tables from positions alone at every forward (Flux's
    `pos_embed(ids)`, Wan's `rope(hidden_states)`): the engine computes it once per input and hands the same
    tables back afterwards (`engine/position_memo.py`). `by_value` names the arguments whose values the tables
    depend on (position ids); every other tensor argument is read only for its shape, dtype and device."""

    attr: str
    by_value: tuple[str, ...] = ()


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
    # (first block, its arguments bound by name) -> the timestep-modulated input of that block: the cheap
    # feature TeaCache-style criteria watch.
    modulated_input: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None
    hidden_states_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    # Tensor arguments without a batch dimension (Flux's position ids): a forward on a subset of the batch
    # rows (`ForwardCall.run_rows`) passes them unchanged even when their first size equals the batch size.
    unbatched_args: tuple[str, ...] = ()
    execution_order: str = "sequential"
    # The pipeline passes timesteps that grow during sampling (Lumina2, Z-Image: 1 - t / 1000): a new
    # generation starts when the timestep falls (a repeated timestep is the next evaluation, e.g. Heun).
    timesteps_increase: bool = False
    # Rotary-table modules that depend only on positions (`PositionTable`): memoized while ditcache is applied.
    position_tables: tuple[PositionTable, ...] = ()
    # Capabilities this model lacks, with the reason (`ditcache.applicability` checks methods against them):
    # (capability, reason) pairs, e.g. ("resized_forward", "..."); token subsets are declared per block list
    # (`no_token_subsets`).
    unsupported: tuple[tuple[str, str], ...] = ()
    # How the diffusers pipeline runs classifier-free guidance (docs and `ditcache models`).
    pipeline_cfg: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.execution_order not in EXECUTION_ORDERS:
            raise ValueError(f"execution_order must be one of {EXECUTION_ORDERS}, got {self.execution_order!r}")


def patch_grid(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> LatentGrid:
    """The token grid of a (B, C, H, W) latent cut into `model.config.patch_size` square patches."""
    latent = kwargs["hidden_states"]
    p = model.config.patch_size
    return LatentGrid(frames=1, height=latent.shape[-2] // p, width=latent.shape[-1] // p, patch=(1, p, p))


def square_patch(model: torch.nn.Module) -> tuple[int, int, int]:
    return (1, model.config.patch_size, model.config.patch_size)


def concatenated_stream_list(attr: str, mlp: tuple[str, ...]) -> BlockListSpec:
    """Single-stream blocks over one [text; image] stream (Chroma, Flux2, AuraFlow): block and attention / MLP
    reuse apply, token subsets do not (the text must always run)."""
    return BlockListSpec(
        attr=attr,
        inputs=("hidden_states",),
        outputs=("hidden_states",),
        kind="joint",
        attention=("attn",),
        mlp=mlp,
        no_token_subsets="single-stream blocks carry [text; image] as one stream (the text must always run)",
    )


def ada_norm_single_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    """The first modulation of an adaLN-single block (`timestep` = the (B, 6 * C) table), as in
    BasicTransformerBlock.forward ("ada_norm_single": PixArt, Latte) and SanaTransformerBlock.forward."""
    hidden_states, timestep = arguments["hidden_states"], arguments["timestep"]
    table = block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)
    shift, scale = table.chunk(6, dim=1)[:2]
    return block.norm1(hidden_states) * (1 + scale) + shift


def adaln_zero_modulated_input(block: torch.nn.Module, arguments: Mapping[str, Any]) -> torch.Tensor:
    """Blocks whose `norm1` is an AdaLayerNormZero called as `norm1(hidden_states, emb=temb)` (Flux, SD3)."""
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]
