"""OmniCache, hierarchical (paper 000): token / frame / block caches with skip-and-refill, and a layered schedule.

In every cached layer the elements the layer would compute redundantly are found by bipartite matching on the
layer's input (`omnicache_matching.py`) and *skip the layer*; their output is refilled from the same layer's
output at the previous denoising step (the layer's output is cached per CFG branch and the fresh outputs are
written back every step). What an element is depends on the layer (Latte's adapter marks the kinds):

- spatial layers (a frame per batch row): Frame Cache (T2S) skips whole frames (alternate frames as
  destinations) and Token Cache skips tokens inside each computed frame (2x2 windows, one random destination);
- temporal layers (a patch position per row): Block Cache (S2T) skips whole positions (2x2 windows of positions);
- joint / spatiotemporal layers (Flux, SD3, Wan, DiT): Token Cache over the image/video tokens of each frame.

`groups` = k matches only inside k x k spatial groups (hierarchical patches: about k^2 less matching work).
`mode="merge"` is the ToMe-style ablation: destinations run on the mean of themselves and their matched sources
and the sources copy their destination's output. With `layered_speedup`, a calibrated (layer, step) schedule
(`calibration/omnicache_layered.py`, Alg. 1-3) additionally skips whole layers at some steps with their cached
residual. See docs/METHODS.md for every choice the paper leaves open.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..adapters import LatentGrid
from ..calibration.profiles import Profile, find_profile
from ..config import PolicyConfig, check_choice, check_float, check_int
from ..engine.calls import BlockCall, BlockRef, ForwardCall
from ..engine.state import BranchState
from ..engine.token_bands import TokenBands, band_grid, from_bands, merge_band_index, to_bands
from ..registry import register_policy, register_preset
from .base import Policy
from .omnicache_matching import BlockPlan, Match, bipartite_match, copy_to_sources, layout, merge_inputs, plan_block

METHOD = "omnicache-layered"
MODES = ("refill", "residual", "merge")
REUSING_MODES = ("refill", "residual")  # skipped elements take something cached at the previous step
GROUPS = (1, 2, 4, 8)
PAPER_RATIOS = {"frame_ratio": 0.3, "block_ratio": 0.4, "token_ratio": 0.2}  # Latte, Sec. 4.2


@dataclasses.dataclass(frozen=True)
class OmniCacheHierarchicalConfig(PolicyConfig):
    r"""
    OmniCache (hierarchical): Token, Frame and Block Cache with skip-and-refill, optionally a layered schedule.

    In each cached layer, elements are split into sources and destinations (one random destination per 2x2
    window of tokens or patch positions, one per pair of adjacent frames), every source is matched to its most
    similar destination (cosine similarity of the layer's input, inside k x k groups), and the most similar
    sources skip the layer: their output is the same layer's output at the previous step, and the fresh outputs
    are cached again. Spatial layers (Latte) skip frames (`frame_ratio`) and tokens inside the computed frames
    (`token_ratio`); temporal layers skip patch positions (`block_ratio`); joint / spatiotemporal layers (Flux,
    SD3, Wan, DiT) skip tokens (`token_ratio`). With `layered_speedup` a calibrated (layer, step) schedule also
    skips whole layers with their cached residual (`ditcache calibrate omnicache-layered`). All ratios 0 and no
    layered schedule compute everything (bit-exact). Presets `omnicache-hier`, `omnicache-merge`,
    `omnicache-layered-2x/3x`, `omnicache-hier-layered-2x`.

    Paper: "OmniCache: Multidimensional Hierarchical Feature Caching for Diffusion Models" (under review,
    2025; the frame / block / token caches, hierarchical patches and layered caching).

    Args:
        token_ratio (`float`, defaults to `0.2`):
            r_t: share of a frame's (or image's) tokens that skip a cached spatial / joint layer, in [0, 0.75]
            (at most the sources: 3 of every 2x2 window).
        frame_ratio (`float`, defaults to `0.3`):
            r_f: share of the frames that skip a cached spatial layer (Frame Cache), in [0, 0.5] (at most the
            source frames: one of every pair).
        block_ratio (`float`, defaults to `0.4`):
            r_b: share of the patch positions that skip a cached temporal layer (Block Cache), in [0, 0.75].
        groups (`int`, defaults to `2`):
            k: matching only inside k x k spatial groups of each frame (hierarchical patches), one of 1, 2, 4, 8;
            1 = flat matching over the whole frame. Must divide the token grid's height and width.
        mode (`str`, defaults to `"refill"`):
            `"refill"` (the paper: skipped elements take the layer's output of the previous step), `"residual"`
            (skipped elements take their current input plus the layer's update of the previous step, output -
            input, as TokenCache and block-level caches reuse: the stale part is the layer's change only, not the
            token's whole state) or `"merge"` (ToMe-style ablation: destinations run on the mean of their matched
            sources, sources copy it).
        skip_first (`int`, *optional*, defaults to `None`):
            Layers left uncached at the start (>= 0). A layer is a block index of each list for interleaved
            models (Latte: spatial i and temporal i), a block position otherwise. `None` = the paper's choice:
            1 for interleaved models (Latte), else 4 of 24 blocks (SD3) scaled to the depth, round(depth / 6).
        skip_last (`int`, *optional*, defaults to `None`):
            Layers left uncached at the end, same rule as `skip_first`.
        warmup_steps (`int`, defaults to `1`):
            First steps computed in full (>= 1 in refill mode: there is no previous output before).
        layered_speedup (`float`, *optional*, defaults to `None`):
            Target MACs speedup of the layered (layer, step) schedule, in [1.05, 10]; `None` = no layered cache.
            Needs a profile (`ditcache calibrate omnicache-layered`) tied to the model and the step count.
        profile (`str`, *optional*, defaults to `None`):
            Path of a layered profile JSON; `None` = the profile found for the model and the step count.
        seed (`int`, defaults to `0`):
            Seed of the random destinations (drawn per step and layer, the same for every batch row), >= 0.
        token_bands (`int`, defaults to `1`):
            Match tokens inside this many equal contiguous parts of the token sequence (whole frames of a video,
            rows of an image), each skipping the same count (`engine/token_bands.py`), in [1, 64]. Under context
            parallelism each rank holds one band (1 = one per rank); in one process `token_bands=N` makes the
            choices of an N-rank context-parallel run. The frame and block caches are not banded.

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> config = ditcache.preset("omnicache-hier")
        >>> (config.frame_ratio, config.block_ratio, config.token_ratio, config.groups)
        (0.3, 0.4, 0.2, 2)
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, config.replace(token_ratio=0.5))
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=4, handle=handle)
        >>> handle.stats().last.block_tokens  # blocks 1-2 of 4 run on 32 of 64 tokens after step 0
        [256, 160, 160, 256]
        >>> handle.remove()
        >>> ditcache.OmniCacheHierarchicalConfig(groups=3)
        Traceback (most recent call last):
        ...
        ValueError: groups must be one of 1, 2, 4, 8; got 3
    """

    profile_method: ClassVar[str] = METHOD  # only used with layered_speedup
    token_ratio: float = 0.2
    frame_ratio: float = 0.3
    block_ratio: float = 0.4
    groups: int = 2
    mode: str = "refill"
    skip_first: int | None = None
    skip_last: int | None = None
    warmup_steps: int = 1
    layered_speedup: float | None = None
    profile: str | None = None
    seed: int = 0
    token_bands: int = 1

    def __post_init__(self) -> None:
        check_float("token_ratio", self.token_ratio, 0.0, 0.75)
        check_float("frame_ratio", self.frame_ratio, 0.0, 0.5)
        check_float("block_ratio", self.block_ratio, 0.0, 0.75)
        check_choice("groups", self.groups, GROUPS)
        if isinstance(self.groups, bool):
            raise ValueError(f"groups must be one of 1, 2, 4, 8; got {self.groups!r}")
        check_choice("mode", self.mode, MODES)
        for name in ("skip_first", "skip_last"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0)
        check_int("warmup_steps", self.warmup_steps, 1 if self.mode in REUSING_MODES else 0)
        if self.layered_speedup is not None:
            check_float("layered_speedup", self.layered_speedup, 1.05, 10.0)
        if self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"profile must be None or a path string, got {self.profile!r}")
        check_int("seed", self.seed, 0)
        check_int("token_bands", self.token_bands, 1, 64)

    @property
    def caches_tokens(self) -> bool:
        return bool(self.token_ratio or self.frame_ratio or self.block_ratio)


def default_skip(interleaved: bool, layers: int) -> int:
    """The paper's excluded layers at each end: 1 of Latte's layers; 4 of SD3's 24 blocks, scaled to the depth."""
    if interleaved:
        return 1
    return int(layers / 6 + 0.5) if layers >= 3 else 0


@dataclasses.dataclass
class HierarchicalState(BranchState):
    # position -> the last token stream ("refill") or its last update, output - input ("residual")
    outputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    residuals: dict[int, dict[str, torch.Tensor | None]] = dataclasses.field(default_factory=dict)  # layered
    grid: LatentGrid | None = None  # the running forward's token grid


@register_policy(OmniCacheHierarchicalConfig)
class OmniCacheHierarchicalPolicy(Policy):
    branch_state = HierarchicalState
    uses_block_hooks = True

    @classmethod
    def requirements(cls, config: OmniCacheHierarchicalConfig) -> tuple[str, ...]:
        ratios = (config.token_ratio, config.frame_ratio, config.block_ratio)
        return ("token_subsets",) if any(ratios) else ()  # the layered schedule alone skips whole blocks

    def __init__(self, config: OmniCacheHierarchicalConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self._given = Profile.load(config.profile) if config.profile else None
        self._schedules: dict[int, frozenset[tuple[int, int]]] = {}  # num_steps -> {(position, step)}
        self.layered: frozenset[tuple[int, int]] = frozenset()

    # ------------------------------------------------------------------ where it applies
    def cached_layers(self) -> list[BlockRef]:
        """The blocks the token / frame / block caches apply to: the excluded first and last layers and the block
        lists the adapter rules out for token subsets (`no_token_subsets`) removed."""
        blocks = self.model_view.blocks
        interleaved = self.adapter.execution_order == "interleaved"
        layer_of = (lambda ref: ref.index) if interleaved else (lambda ref: ref.position)
        layers = 1 + max((layer_of(ref) for ref in blocks), default=-1)
        first = self.config.skip_first if self.config.skip_first is not None else default_skip(interleaved, layers)
        last = self.config.skip_last if self.config.skip_last is not None else default_skip(interleaved, layers)
        return [
            ref
            for ref in blocks
            if first <= layer_of(ref) < layers - last and not getattr(ref.spec, "no_token_subsets", "")
        ]

    def bind(self, model_view: Any) -> None:
        super().bind(model_view)
        self._cached = {ref.position for ref in self.cached_layers()}

    # ------------------------------------------------------------------ hooks
    def forward(self, call: ForwardCall) -> Any:
        call.state.grid = self.model_view.grid(call.arguments)
        self.layered = self._schedule(call) if self.config.layered_speedup is not None else frozenset()
        return call.run()

    def _schedule(self, call: ForwardCall) -> frozenset[tuple[int, int]]:
        from ..calibration.omnicache_layered import schedule_from_profile

        num_steps = call.info.num_steps
        if num_steps is None:
            raise ValueError(
                "layered_speedup needs the number of steps: use a pipeline or handle.generation(num_steps=...)"
            )
        if num_steps not in self._schedules:
            model = self.model_view.model
            profile = self._given or find_profile(METHOD, model, num_steps)
            profile.check(METHOD, model, num_steps)
            cells = schedule_from_profile(profile.data, self.config.layered_speedup, self.model_view.num_blocks)
            self._schedules[num_steps] = frozenset(cells)
        return self._schedules[num_steps]

    def block(self, call: BlockCall) -> Any:
        state: HierarchicalState = call.forward.state
        position = call.ref.position
        if (position, call.info.step) in self.layered and position in state.residuals:
            return call.skip(state.residuals[position])
        inputs = call.inputs() if self.layered else None
        output = self._run(call, state)
        if self.layered:
            state.residuals[position] = call.forward.store(call.residuals(inputs, call.outputs_of(output)))
        return output

    def _run(self, call: BlockCall, state: HierarchicalState) -> Any:
        config: OmniCacheHierarchicalConfig = self.config
        position, name = call.ref.position, call.ref.spec.token_stream
        if position not in self._cached or not config.caches_tokens:
            return call.run()
        x, kind = call.arguments[name], call.ref.spec.kind
        # token bands split the token axis; temporal layers' tokens are frames, never sharded
        bands = TokenBands.resolve(config.token_bands, call.forward.decisions) if kind != "temporal" else TokenBands()
        size = bands.size(x.shape[1])
        plan = plan_block(kind, x.shape[0], size, band_grid(state.grid, size * bands.total, bands.total), config)
        if plan is None:
            return call.run()
        previous = state.outputs.get(position)
        reuses = config.mode in REUSING_MODES
        if call.info.step < config.warmup_steps or (reuses and (previous is None or previous.shape != x.shape)):
            output = call.run()
        else:
            output = self._cached_run(call, plan, previous, bands.local)
        if reuses:  # the layer's output ("refill") or its update ("residual"), for the next step
            fresh = call.outputs_of(output)[name]
            state.outputs[position] = call.forward.store(fresh if config.mode == "refill" else fresh - x)
        return output

    def _cached_run(self, call: BlockCall, plan: BlockPlan, previous: torch.Tensor | None, bands: int) -> Any:
        name = call.ref.spec.token_stream
        x = call.arguments[name]
        generator = torch.Generator().manual_seed(self._seed(call))
        rows = index = row_match = token_match = None
        if plan.row_r:
            per_sample = plan.row_geometry.num_elements
            row_match = bipartite_match(
                x.reshape(plan.samples, per_sample, -1), layout(plan.row_geometry, generator), plan.row_r
            )
            kept = row_match.kept(per_sample)
            rows = (kept + per_sample * torch.arange(plan.samples, device=kept.device)[:, None]).flatten()
        if plan.token_r:
            computed = x if rows is None else x.index_select(0, rows.to(x.device))
            size = x.shape[1] // bands  # each band matches on its own, with the same layout
            token_match = bipartite_match(
                to_bands(computed, bands), layout(plan.token_geometry, generator), plan.token_r
            )
            index = merge_band_index(token_match.kept(size), bands, size)
        if self.config.mode == "refill":
            return call.run_rows(rows, previous, index)
        if self.config.mode == "residual":
            return call.run_rows(rows, x + previous, index)
        return self._merge_run(call, plan, rows, index, row_match, token_match, bands)

    def _merge_run(
        self,
        call: BlockCall,
        plan: BlockPlan,
        rows: torch.Tensor | None,
        index: torch.Tensor | None,
        row_match: Match | None,
        token_match: Match | None,
        bands: int,
    ) -> Any:
        """ToMe-style: run on merged inputs (destinations = mean with their sources), copy outputs to sources."""
        name = call.ref.spec.token_stream
        x = call.arguments[name]
        merged = x
        if row_match is not None:
            merged = merge_inputs(x.reshape(plan.samples, -1, x[0].numel()), row_match).reshape(x.shape)
        if token_match is not None:
            if rows is None:
                merged = _in_bands(merge_inputs, merged, token_match, bands)
            else:
                device_rows = rows.to(x.device)
                merged = merged.index_copy(
                    0, device_rows, _in_bands(merge_inputs, merged.index_select(0, device_rows), token_match, bands)
                )
        values = call.outputs_of(call.run_rows(rows, x, index, stream=merged))
        y = values[name]
        if token_match is not None:
            if rows is None:
                y = _in_bands(copy_to_sources, y, token_match, bands)
            else:
                device_rows = rows.to(y.device)
                picked = y.index_select(0, device_rows)
                y = y.index_copy(0, device_rows, _in_bands(copy_to_sources, picked, token_match, bands))
        if row_match is not None:
            y = copy_to_sources(y.reshape(plan.samples, -1, y[0].numel()), row_match).reshape(x.shape)
        values[name] = y
        return call.build_output(values)

    def _seed(self, call: BlockCall) -> int:
        return (self.config.seed * 1_000_003 + call.info.step * 1_009 + call.ref.position) % (2**63)


def _in_bands(fn: Any, x: torch.Tensor, match: Match, bands: int) -> torch.Tensor:
    """`fn(x, match)` (merge / copy over a token match made per band) on each band of `x` as a row of its own."""
    return from_bands(fn(to_bands(x, bands), match), bands)


PRESET_HELP = "OmniCache (hierarchical): frame / block / token caches at the paper's ratios (30/40/20%)"
register_preset("omnicache-hier", lambda: OmniCacheHierarchicalConfig(), PRESET_HELP + ", skip-and-refill")
register_preset(
    "omnicache-merge",
    lambda: OmniCacheHierarchicalConfig(mode="merge"),
    "OmniCache ablation: ToMe-style merge-and-copy at the paper's ratios",
)
for _n in (2, 3):
    register_preset(
        f"omnicache-layered-{_n}x",
        lambda n=_n: OmniCacheHierarchicalConfig(token_ratio=0.0, frame_ratio=0.0, block_ratio=0.0, layered_speedup=n),
        f"OmniCache layered cache alone: calibrated (layer, step) schedule at {_n}x MACs (needs a profile)",
    )
register_preset(
    "omnicache-hier-layered-2x",
    lambda: OmniCacheHierarchicalConfig(layered_speedup=2.0),
    PRESET_HELP + " plus the layered schedule at 2x (needs a profile)",
)
