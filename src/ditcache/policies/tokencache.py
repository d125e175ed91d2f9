"""TokenCache (paper 003): a learned Cache Predictor picks, per P-step, which tokens of which blocks reuse their
cached update; I-steps compute everything and refresh the cache.

- I-step (step 0, then the steps of the Eq. 13 schedule): every block runs on every token; the update of each
  cacheable block, output - input per token, is stored (Eq. 5).
- P-step: the predictor runs once, on block 0's own arguments, and scores every (token, block); Eq. 12 turns
  the global cache ratio r into the number of tokens each block updates (shared by the batch), and each row
  updates its own top-scoring tokens: the block runs on those tokens only (`BlockCall.run_tokens`) and the
  others take input + cached update (Eq. 6). The fresh tokens' updates replace their cached ones.
- The last K blocks ("refiners") never cache; at P-steps that cache something they run with the profile's LoRA
  weights, applied only inside the engine's block hook (the model is never modified).

The predictor, its LoRA and the per-step mean scores come from a profile made by `ditcache calibrate tokencache`
(`calibration/tokencache.py`); see docs/METHODS.md for the choices made where the paper is ambiguous.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch

from ..config import PolicyConfig, check_bool, check_choice, check_float, check_int
from ..engine.calls import BlockCall, ForwardCall
from ..engine.forecast import FEATURE_FORECASTS, Forecaster, History, check_forecast, forecast
from ..engine.state import BranchState
from ..engine.token_bands import ShardedLike, TokenBands
from ..registry import register_policy, register_preset
from .base import Policy
from .tokencache_attention import supports_full_context
from .tokencache_runs import fresh_tokens, predict_scores, run_and_store_update, run_cached_block, subset_capable
from .tokencache_schedule import ISTEP_SCHEDULES, block_keep_counts, choose_tokens, istep_schedule, uniform_keep_counts

METHOD = "tokencache"
SELECTIONS = ("learned", "random", "norm")
ATTENTIONS = ("auto", "kept", "all")


@dataclasses.dataclass(frozen=True)
class TokenCacheConfig(PolicyConfig):
    r"""
    TokenCache: a trained Cache Predictor chooses which tokens of which blocks reuse their cached update.

    I-steps (the first step, then `full_steps - 1` more from the Eq. 13 schedule) run every block on every token
    and cache each block's per-token update (output - input). At the other steps (P-steps) the predictor (a
    copy of block 0 with a scoring head, trained by `ditcache calibrate tokencache`) scores every (token,
    block) once; the global cache `ratio` is split into per-block update fractions (Eq. 12, shared by the
    batch) and each row updates its own top-scoring tokens: the block runs on them only, the others add their
    cached update. The last `refiners` blocks never cache and, when the profile has LoRA weights, run with
    them at P-steps. Ratio 0 is exactly the uncached model.

    Paper: "Token Caching for Diffusion Transformer Acceleration", Lou, Luo, Liu et al. (TokenCache; paper
    003 of docs/METHODS.md).

    Args:
        ratio (`float`, defaults to `0.9`):
            Global cache ratio r in [0, 1]: the share of (block, token) updates reused at a P-step, over the
            cacheable blocks. 0 = nothing reused (bit-exact); 1 = every cacheable block adds its cached update.
        full_steps (`int | float`, defaults to `0.2`):
            The I-steps (fully computed steps, the first included): an integer count in [1, 1000], or a float
            in (0, 1), the share of the steps (rounded, at least 1; 0.2 = 10 of 50). More = slower, closer.
        beta (`float | None`, defaults to `None`):
            Eq. 13 smoothing: I-step weights exp(beta x mean predictor score of the step), in [-1e6, 1e6];
            None = the value stored in the profile (chosen at calibration). Only used by `schedule="eq13"`.
        schedule (`str`, defaults to `"eq13"`):
            I-step placement: `"eq13"` (uniform percentiles of the cumulative Eq. 13 weights) or `"uniform"`
            (evenly spaced; the ablation).
        selection (`str`, defaults to `"learned"`):
            Token scores: `"learned"` (the Cache Predictor + Eq. 12 block allocation), `"random"` (a seeded
            random permutation per step and block, the same for every row) or `"norm"` (the norm of each token's
            cached update, per row). The last two give every block the same share (1 - ratio) and skip the
            predictor (ablations).
        refiners (`int | None`, defaults to `None`):
            K, the last blocks that never cache, in [0, 64]; None = the profile's K (what its LoRA was trained
            for).
        lora (`bool`, defaults to `True`):
            Run the refiners with the profile's LoRA weights at P-steps that cache something.
        attention (`str`, defaults to `"auto"`):
            What the updated tokens attend to at a P-step: `"kept"` (only the other updated tokens: the block
            runs on the subset, `BlockCall.run_tokens`; cheapest), `"all"` (every token of the block's input,
            cached ones included, as Eq. 6 writes f(x^{l-1}): queries from the updated tokens, keys / values
            from all; DiT-style blocks only, whose self-attention `attn1` takes keys / values as
            `encoder_hidden_states`) or `"auto"` (`"all"` where supported, else `"kept"`).
        per_row (`bool`, defaults to `True`):
            Each batch row updates its own top-scoring tokens (the paper's per-sample top-k; rows independent),
            or, False, the batch shares the tokens of its row-averaged scores (rows then depend on each other).
            False is much faster on models with a per-token argument without a batch axis (Flux's rotary
            table), where rows with different tokens run one by one (ref-image, 8 samples: wall / MACs
            efficiency 0.52 per row, 0.85 shared).
        seed (`int`, defaults to `0`):
            Seed of `selection="random"`, >= 0.
        forecast (`str`, defaults to `"copy"`):
            What a token that is not updated takes as its update (`ditcache.engine.forecast`): `"copy"` (the
            cached one, the paper) or a forecast of the block's updates at the last I-steps, evaluated at this
            step: `"taylor1"`, `"taylor2"`, `"hermite"`. Tokens updated at an earlier P-step keep that fresher
            update. E.g. `"tokencache:forecast=hermite"`.
        token_bands (`int`, defaults to `1`):
            Select tokens inside this many equal contiguous parts of the token sequence, the same count in each
            (`engine/token_bands.py`), in [1, 64]. Under context parallelism each rank holds one band (1 = one
            per rank; more must be a multiple of the ranks); in one process, `token_bands=N` makes exactly the
            choices of an N-rank context-parallel run. The Eq. 12 allocation stays global.
        profile (`str`, *optional*, defaults to `None`):
            Path of a TokenCache profile JSON (its weights file next to it); `None` = the profile made for this
            model and step count in the profile directories.

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs
        >>> ditcache.TokenCacheConfig(ratio=1.5)
        Traceback (most recent call last):
        ...
        ValueError: ratio must be in [0.0, 1.0], got 1.5
        >>> model, inputs = tiny_model("dit"), tiny_inputs("dit")
        >>> uncond = tiny_uncond_inputs("dit", inputs)
        >>> def run(handle):  # one generation of a hand-written sampling loop
        ...     return euler_sample(model, "dit", inputs, 8, uncond, handle=handle)
        >>> profile = ditcache.calibrate(model, "tokencache", num_steps=8, run=run, guidance=3.0)  # trains it
        >>> handle = ditcache.apply(model, "tokencache:full_steps=2")
        >>> with handle.generation(num_steps=8):
        ...     _ = run(handle)
        >>> len(handle.policy.i_steps(8)), handle.policy.i_steps(8)[0]  # step 0 is always an I-step
        (2, 0)
        >>> handle.stats().last.token_fraction < 1.0
        True
        >>> handle.remove()
    """

    profile_method: ClassVar[str] = METHOD
    ratio: float = 0.9
    full_steps: int | float = 0.2
    beta: float | None = None
    schedule: str = "eq13"
    selection: str = "learned"
    refiners: int | None = None
    lora: bool = True
    attention: str = "auto"
    per_row: bool = True
    seed: int = 0
    forecast: str = "copy"
    token_bands: int = 1
    profile: str | None = None

    def __post_init__(self) -> None:
        check_float("ratio", self.ratio, 0.0, 1.0)
        if isinstance(self.full_steps, float):
            check_float("full_steps", self.full_steps, 0.0, 1.0, low_open=True)
            if self.full_steps >= 1.0:
                raise ValueError(f"full_steps must be an integer count or a share in (0, 1), got {self.full_steps!r}")
        else:
            check_int("full_steps", self.full_steps, 1, 1000)
        if self.beta is not None:
            check_float("beta", self.beta, -1e6, 1e6)
        check_choice("schedule", self.schedule, ISTEP_SCHEDULES)
        check_choice("selection", self.selection, SELECTIONS)
        if self.refiners is not None:
            check_int("refiners", self.refiners, 0, 64)
        check_bool("lora", self.lora)
        check_choice("attention", self.attention, ATTENTIONS)
        check_bool("per_row", self.per_row)
        check_int("seed", self.seed, 0)
        check_forecast(self.forecast, FEATURE_FORECASTS, "multistep extrapolates whole outputs")
        check_int("token_bands", self.token_bands, 1, 64)
        if self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"profile must be None or a path string, got {self.profile!r}")

    def full_step_count(self, num_steps: int) -> int:
        """The number of I-steps in a generation of `num_steps` steps."""
        if isinstance(self.full_steps, float):
            return max(1, int(round(self.full_steps * num_steps)))
        return min(self.full_steps, num_steps)

    @property
    def needs_profile(self) -> bool:
        """Random / norm selection with uniform I-steps and an explicit K runs without a trained predictor."""
        return self.selection == "learned" or self.schedule == "eq13" or self.refiners is None or self.lora


@dataclasses.dataclass
class TokenCacheState(BranchState):
    """One CFG branch: the cached per-token updates and this step's plan."""

    updates: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # block position -> (rows, N, C)
    stream_shape: tuple[int, ...] | None = None  # block 0's token stream shape at the last I-step
    p_step: bool = False
    counts: dict[int, int] = dataclasses.field(default_factory=dict)  # position -> tokens updated per band
    bands: TokenBands = TokenBands()  # this P-step's selection bands (one per context-parallel rank)
    histories: dict[int, History] = dataclasses.field(default_factory=dict)  # position -> I-step updates
    fresh: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # position -> updated since I-step
    scores: torch.Tensor | None = None  # (rows, N, num_blocks) predictor scores of this P-step
    refine: bool = False  # this P-step caches something: refiners run with LoRA


@dataclasses.dataclass
class Setup:
    """What a step count needs, resolved once: I-steps, K, and the predictor / LoRA when used."""

    i_steps: list[int]
    refiners: int
    full_context: bool = False  # updated tokens attend to every token (attention="all")
    predictor: torch.nn.Module | None = None
    lora: Any = None  # calibration.tokencache_predictor.LoRA


@register_policy(TokenCacheConfig)
class TokenCachePolicy(Policy):
    branch_state = TokenCacheState
    uses_block_hooks = True
    requires = ("token_subsets",)

    def __init__(self, config: TokenCacheConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.forecaster = Forecaster.of(config.forecast)
        self._setups: dict[int, Setup] = {}
        self.trace: list[tuple[int, str, list[int]]] = []  # (step, branch, tokens per row of each block)

    def reset(self) -> None:
        self.trace = []

    # ------------------------------------------------------------------ setup
    def i_steps(self, num_steps: int) -> list[int]:
        """The I-steps this config uses for a generation of `num_steps` steps."""
        return self._setup(num_steps).i_steps

    def _setup(self, num_steps: int | None) -> Setup:
        if num_steps is None:
            raise ValueError(
                "TokenCache needs the number of sampling steps: use a pipeline, or handle.generation(num_steps=...)"
            )
        if num_steps not in self._setups:
            self._setups[num_steps] = self._build_setup(num_steps)
        return self._setups[num_steps]

    def _build_setup(self, num_steps: int) -> Setup:
        config = self.config
        full_context = supports_full_context(self.model_view)
        if config.attention == "all" and not full_context:
            raise ValueError(
                f'attention="all" needs DiT-style blocks (self-attention attn1 taking keys / values as '
                f'encoder_hidden_states); this {self.adapter.name} model supports attention="kept" (or "auto")'
            )
        full_context = full_context and config.attention != "kept"
        if not any(subset_capable(ref) for ref in self.model_view.blocks[: self.model_view.num_blocks - 1]):
            reasons = sorted({ref.spec.no_token_subsets for ref in self.model_view.blocks})
            warnings.warn(
                f"TokenCache: no block of this {self.adapter.name} model can run on a token subset "
                f"({'; '.join(reasons)}); every step is computed in full",
                stacklevel=2,
            )
            return Setup(list(range(num_steps)), 0, False)
        if not config.needs_profile:
            steps = istep_schedule([0.0] * num_steps, config.full_step_count(num_steps), mode="uniform")
            return Setup(steps, config.refiners, full_context)
        from ..calibration.tokencache import load_profile

        loaded = load_profile(self.model_view, num_steps, config.profile)
        refiners = loaded.refiners if config.refiners is None else config.refiners
        beta = loaded.beta if config.beta is None else config.beta
        steps = istep_schedule(loaded.mean_scores, config.full_step_count(num_steps), beta, config.schedule)
        num_blocks = self.model_view.num_blocks
        lora = loaded.lora if config.lora and loaded.lora is not None and refiners > 0 else None
        if lora is not None and not lora.positions & set(range(num_blocks - refiners, num_blocks)):
            lora = None
        # the predictor (a copy of block 0) attends like the blocks: over every rank's tokens under Ulysses
        predictor = ShardedLike(self.model_view.model, loaded.predictor) if config.selection == "learned" else None
        return Setup(steps, refiners, full_context, predictor, lora)

    # ------------------------------------------------------------------ hooks
    def forward(self, call: ForwardCall) -> Any:
        setup = self._setup(call.info.num_steps)
        state: TokenCacheState = call.state
        state.p_step = call.info.step not in setup.i_steps and bool(state.updates)
        state.counts, state.scores, state.refine = {}, None, False
        return call.run()

    def block(self, call: BlockCall) -> Any:
        state: TokenCacheState = call.forward.state
        setup = self._setups[call.info.num_steps]
        position = call.ref.position
        stream = call.arguments[call.ref.spec.token_stream]
        if not isinstance(stream, torch.Tensor) or stream.ndim != 3:
            return call.run()
        cacheable = self._cacheable(call, stream, setup, state)
        if not state.p_step:
            if position == 0:
                state.stream_shape = tuple(stream.shape)
            if not cacheable:
                return call.run()
            output, state.updates[position] = run_and_store_update(call)
            self.forecaster.remember_at(
                call.forward, state.histories, position, call.info.step, state.updates[position]
            )
            state.fresh.pop(position, None)
            return output
        if position == 0:
            self._plan(call, setup, state, stream)
        if position >= self.model_view.num_blocks - setup.refiners:
            if state.refine and setup.lora is not None and position in setup.lora.positions:
                with setup.lora.applied(position, call.ref.module):
                    return call.run()
            return call.run()
        update = call.forward.fetch(state.updates.get(position))  # from cache_dtype / cache_device, if set
        if not cacheable or update is None or update.shape != stream.shape:
            return call.run()
        keep = state.counts.get(position, state.bands.size(stream.shape[1]))
        if not self.forecaster.copies:
            update = self._forecast(call, state, position, update)
        index = self._index(call, state, position, keep, update)
        output, state.updates[position] = run_cached_block(call, index, update, setup.full_context)
        if not self.forecaster.copies:
            state.fresh[position] = fresh_tokens(state.fresh.get(position), index, stream.shape[:2])
        return output

    def _forecast(self, call: BlockCall, state: TokenCacheState, position: int, update: torch.Tensor) -> torch.Tensor:
        """The updates of the tokens not updated since the last I-step, forecast from the I-steps' updates at
        this step; the others keep their fresher update."""
        history = state.histories.get(position)
        if history is None or len(history) < 2:
            return update
        predicted = call.forward.fetch(forecast(self.forecaster.mode, history, float(call.info.step)))
        fresh = state.fresh.get(position)
        return predicted if fresh is None else torch.where(fresh.unsqueeze(-1), update, predicted)

    def _cacheable(self, call: BlockCall, stream: torch.Tensor, setup: Setup, state: TokenCacheState) -> bool:
        """Blocks before the refiners that can run on a token subset and whose token stream is laid out like
        block 0's (Latte's temporal blocks, tokens = frames, are not)."""
        if call.ref.position >= self.model_view.num_blocks - setup.refiners or not subset_capable(call.ref):
            return False
        return state.stream_shape is None or tuple(stream.shape) == state.stream_shape

    def _plan(self, call: BlockCall, setup: Setup, state: TokenCacheState, stream: torch.Tensor) -> None:
        """Once per P-step, at block 0: tokens each row updates in each band of every cacheable block (Eq. 12
        over every rank's scores, or uniform)."""
        positions = sorted(state.updates)
        decisions = call.forward.decisions
        state.bands = bands = TokenBands.resolve(self.config.token_bands, decisions)
        tokens = bands.size(stream.shape[1]) * bands.total  # the whole sequence, over every rank
        if setup.predictor is not None:
            state.scores = scores = predict_scores(call, setup.predictor)
            counts, _ = block_keep_counts(decisions.gather_whole(scores)[..., positions], self.config.ratio)
        else:
            counts = uniform_keep_counts(tokens, len(positions), self.config.ratio)
        size = tokens // bands.total
        state.counts = {p: min(size, int(round(k / bands.total))) for p, k in zip(positions, counts)}
        state.refine = any(k < size for k in state.counts.values())
        self.trace.append((call.info.step, call.info.branch, [state.counts[p] * bands.total for p in positions]))

    def _index(
        self, call: BlockCall, state: TokenCacheState, position: int, keep: int, update: torch.Tensor
    ) -> torch.Tensor:
        selection, per_row, bands = self.config.selection, self.config.per_row, state.bands
        # tokens shared by the rows come from the whole batch's mean score (data parallelism: every rank's rows)
        whole = (lambda scores: scores) if per_row else call.forward.decisions.gather_rows
        if selection == "learned" and state.scores is not None:
            return choose_tokens(whole(state.scores[..., position]), keep, per_row, bands.local)
        if selection == "norm":
            return choose_tokens(whole(update.float().norm(dim=-1)), keep, per_row, bands.local)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + call.info.step * 1009 + position)
        tokens = update.shape[1]
        if bands.total == 1:
            return torch.randperm(tokens, generator=generator)[:keep].sort().values.to(update.device)
        # one permutation of the whole sequence (the same on every rank), as scores: earlier = higher
        size = bands.size(tokens)
        order = torch.randperm(size * bands.total, generator=generator)
        ranks = torch.empty(order.shape, dtype=torch.float32).index_put_((order,), -torch.arange(order.numel()).float())
        local = ranks[bands.first * size : bands.first * size + tokens].to(update.device)
        return choose_tokens(local[None], keep, False, bands.local)


register_preset("tokencache", lambda: TokenCacheConfig(), "TokenCache: learned token / block / step caching, r = 0.9")
register_preset(
    "tokencache-fast",
    lambda: TokenCacheConfig(full_steps=0.14),
    "TokenCache, 7 of 50 I-steps (faster; needs `ditcache calibrate tokencache`)",
)
register_preset(
    "tokencache-safe",
    lambda: TokenCacheConfig(schedule="uniform"),
    "TokenCache with evenly spaced I-steps (on ref-dit 2.4 dB closer to the uncached model than Eq. 13 at the same "
    "MACs; r = 0.8 with 14 I-steps was slower and further)",
)
