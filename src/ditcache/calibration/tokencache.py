"""TokenCache calibration: train the Cache Predictor (and LoRA refiners) on the model's own sampling trajectory.

1. Record one generation (any sampler: `run()` / `run(handle)`, see `ditcache.calibrate`) through the engine's
   hooks: per (branch, step) the model's arguments, every block's per-token update (output - input), block 0's
   arguments and the last block's output.
2. Predictor (Alg. 1, with the model's own states instead of forward-noised data): for a pair (step s - 1 ->
   s) of one branch, the cache holds the updates of step s - 1; the model forward at step s is replayed with
   the relaxed cached path x^l = x^{l-1} + a f_s(x^{l-1}) + (1 - a) f_{s-1} *propagated* through the blocks
   (a = the predictor's scores from block 0's arguments at s; the last K blocks run fully), and the loss is
   ||x^L - x^L_full||^2 on the last block's token stream, normalised by its value with a = 0 (everything
   cached), plus lambda x mean(a). Frozen model; the predictor (a copy of block 0 + head) is trained.
3. LoRA (K > 0): predictor frozen, rank-r LoRA on every Linear of the last K blocks, trained on the same pairs
   with hard Eq. 12 / top-k decisions and real token-subset runs (`BlockCall.run_tokens`), as at inference.
4. Eq. 13 data: the trained predictor's mean score per step (over rows, tokens, cacheable blocks and branches).

Weights go to safetensors next to the JSON profile (`TokenCacheProfile.save`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import PolicyConfig
from ..engine.calls import BlockCall, ForwardCall
from ..policies.base import Policy
from ..policies.tokencache import METHOD, supports_full_context
from ..policies.tokencache_runs import run_cached_block, subset_capable
from ..policies.tokencache_schedule import block_keep_counts, choose_tokens, istep_schedule
from ..registry import register_policy
from .profiles import Profile, ProfileMismatchError, find_profile, model_fingerprint
from .record import CalibrationRun, record
from .tokencache_predictor import (
    CachePredictor,
    LoRA,
    TokenCacheProfile,
    join_tensors,
    load_tensors,
    split_tensors,
)
from .validate import load_weights

Key = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """TokenCache training options (`train_tokencache`); `ditcache.calibrate(..., "tokencache")` uses the defaults.

    refiners: K, the last blocks never cached (LoRA-refined); lambda_: weight of mean(a) against the cache
    loss normalised to 1 for "everything cached"; ratio: the cache ratio of the hard LoRA stage; iterations /
    lora_iterations: optimiser steps of the two stages; minutes: time budget of both (stage 1 gets 75% when
    LoRA trains); beta: Eq. 13 smoothing stored as the profile's default (None: chosen from the scores, see
    `default_beta`); full_steps: I-steps of the schedule stored for information."""

    refiners: int = 1
    lora_rank: int = 4
    lambda_: float = 0.05
    ratio: float = 0.9
    iterations: int = 300
    lora_iterations: int = 120
    lr: float = 1e-3
    lora_lr: float = 5e-4
    minutes: float = 10.0
    beta: float | None = None
    full_steps: int = 10
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("refiners", "iterations", "lora_iterations", "full_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or not 1 <= self.lora_rank <= 64:
            raise ValueError(f"lora_rank must be an integer in [1, 64], got {self.lora_rank!r}")
        for name, low, high in (("lambda_", 0.0, 100.0), ("ratio", 0.0, 1.0), ("minutes", 0.0, 1e4)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        for name in ("lr", "lora_lr"):
            if not isinstance(getattr(self, name), float) or not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be a float in (0, 1), got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------------------- recording
@dataclasses.dataclass(frozen=True)
class TokenCacheRecordConfig(PolicyConfig):
    """Internal: record what TokenCache training needs, computing everything."""


def _keep(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and all(isinstance(t, torch.Tensor) for t in value):
        return tuple(t.detach().clone() for t in value)
    return value


@register_policy(TokenCacheRecordConfig)
class TokenCacheRecorder(Policy):
    uses_block_hooks = True

    def __init__(self, config: PolicyConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.arguments: dict[Key, dict[str, Any]] = {}  # model forward arguments
        self.block0: dict[Key, dict[str, Any]] = {}  # block 0's arguments
        self.updates: dict[Key, dict[int, torch.Tensor]] = {}  # cacheable block position -> update
        self.finals: dict[Key, torch.Tensor] = {}  # last block's token stream
        self.width = 0
        self._key: Key = ("default", 0)

    def forward(self, call: ForwardCall) -> Any:
        self._key = (call.info.branch, call.info.step)
        self.arguments[self._key] = {k: _keep(v) for k, v in call.arguments.items()}
        self.updates[self._key] = {}
        return call.run()

    def block(self, call: BlockCall) -> Any:
        name, position = call.ref.spec.token_stream, call.ref.position
        stream = call.arguments[name]
        if position == 0:
            self.block0[self._key] = {k: _keep(v) for k, v in call.arguments.items()}
            self.width = stream.shape[-1]
        output = call.run()
        fresh = call.outputs_of(output)[name]
        if tuple(stream.shape) == tuple(self.block0[self._key][name].shape):
            self.updates[self._key][position] = (fresh - stream).detach()
        if position == self.model_view.num_blocks - 1:
            self.finals[self._key] = fresh.detach().clone()
        return output


# ------------------------------------------------------------------------------------------------- training passes
@dataclasses.dataclass(frozen=True)
class TokenCacheTrainConfig(PolicyConfig):
    """Internal: the relaxed (stage 1) and hard (stage 2) cached passes of TokenCache training."""


@register_policy(TokenCacheTrainConfig)
class TokenCacheTrainer(Policy):
    uses_block_hooks = True

    def __init__(self, config: PolicyConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.mode = "relaxed"  # "relaxed" | "hard"
        self.predictor: torch.nn.Module | None = None
        self.lora: LoRA | None = None
        self.cache: dict[int, torch.Tensor] = {}
        self.cacheable: list[int] = []
        self.ratio = 0.9
        self.full_context = False  # LoRA stage: updated tokens attend to every token (attention="all")
        self.force_alpha: float | None = None  # relaxed pass with a constant a (0 = everything cached)
        self.alpha: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        self._counts: dict[int, int] = {}
        self._scores: torch.Tensor | None = None

    def block(self, call: BlockCall) -> Any:
        name, position = call.ref.spec.token_stream, call.ref.position
        stream = call.arguments[name]
        relaxed = self.mode == "relaxed"
        output = self._relaxed(call, name, position, stream) if relaxed else self._hard(call, position)
        if position == self.model_view.num_blocks - 1:
            self.final = call.outputs_of(output)[name]
        return output

    def _relaxed(self, call: BlockCall, name: str, position: int, stream: torch.Tensor) -> Any:
        if position == 0 and self.force_alpha is None:
            self.alpha = self.predictor(**call.arguments)
        output = call.run()
        if position not in self.cacheable:
            return output
        values = call.outputs_of(output)
        a = self.force_alpha if self.force_alpha is not None else self.alpha[..., position : position + 1]
        values[name] = stream + a * (values[name] - stream) + (1 - a) * self.cache[position]
        return call.build_output(values)

    def _hard(self, call: BlockCall, position: int) -> Any:
        if position == 0:
            with torch.no_grad():
                self._scores = self.predictor(**call.arguments)
            counts, _ = block_keep_counts(self._scores[..., self.cacheable], self.ratio)
            self._counts = dict(zip(self.cacheable, counts))
        if position in self.cacheable:
            with torch.no_grad():
                index = choose_tokens(self._scores[..., position], self._counts[position], per_row=True)
                return run_cached_block(call, index, self.cache[position], self.full_context)[0]
        if self.lora is not None and position in self.lora.positions:
            with self.lora.applied(position, call.ref.module):
                return call.run()
        return call.run()


# ------------------------------------------------------------------------------------------------- training
def calibrate(model: torch.nn.Module, generation: CalibrationRun, model_name: str | None = None) -> TokenCacheProfile:
    """The calibrator `ditcache.calibrate(target, "tokencache", ...)` runs: `train_tokencache` with defaults."""
    return train_tokencache(model, generation, model_name)


def train_tokencache(
    model: torch.nn.Module,
    generation: CalibrationRun,
    model_name: str | None = None,
    options: TrainOptions | None = None,
) -> TokenCacheProfile:
    """Train TokenCache's Cache Predictor (and LoRA refiners) on one recorded generation of `model`.

    `generation` is what `ditcache.calibrate` builds (`CalibrationRun(run, num_steps, guidance)`; the reference
    pipelines' `calibration_run(num_steps, samples)`). Training data are the model's own states along that
    generation (a dataset works the same way: make `run` sample from noised dataset latents). Returns the
    profile (not saved; `profile.save(path)` writes the JSON and the safetensors weights next to it)."""
    from ..api import apply

    options = options or TrainOptions()
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    recorder, _ = record(model, TokenCacheRecordConfig(), generation)
    num_blocks = recorder.model_view.num_blocks
    if options.refiners >= num_blocks:
        raise ValueError(f"refiners must be below the number of blocks ({num_blocks}), got {options.refiners}")
    keys = sorted(recorder.arguments)
    pairs = [(b, s) for b, s in keys if s >= 1 and (b, s - 1) in recorder.arguments]
    if not pairs:
        raise ValueError("TokenCache training needs at least two recorded steps per branch")
    first = recorder.updates[keys[0]]
    blocks = recorder.model_view.blocks
    cacheable = [p for p in sorted(first) if p < num_blocks - options.refiners and subset_capable(blocks[p])]
    if not cacheable:
        reasons = "; ".join(sorted({ref.spec.no_token_subsets for ref in blocks if ref.spec.no_token_subsets}))
        raise ValueError(
            f"TokenCache cannot cache any block of this {recorder.adapter.name} model: every block is a refiner, "
            f"has another token layout than block 0 or cannot run on a token subset{f' ({reasons})' if reasons else ''}"
        )
    block0 = recorder.model_view.blocks[0]
    spec = block0.spec
    predictor = CachePredictor(block0.module, recorder.width, num_blocks, spec.outputs, spec.token_stream)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    handle = apply(model, TokenCacheTrainConfig())
    trainer: TokenCacheTrainer = handle.policy
    trainer.cacheable, trainer.ratio = cacheable, options.ratio
    trainer.full_context = supports_full_context(trainer.model_view)
    budget = options.minutes * 60.0
    history: dict[str, list[float]] = {"predictor": [], "lora": []}
    try:
        baseline: dict[Key, float] = {}

        def replay(key: Key) -> None:
            with handle.branch(key[0], step_index=key[1]):
                model(**{**recorder.arguments[key], "return_dict": False})

        def cache_error(key: Key) -> float:  # ||x^L - x^L_full||^2 with everything cached: the loss unit
            if key not in baseline:
                trainer.mode, trainer.force_alpha, trainer.cache = (
                    "relaxed",
                    0.0,
                    recorder.updates[(key[0], key[1] - 1)],
                )
                with torch.no_grad():
                    replay(key)
                baseline[key] = max(float((trainer.final - recorder.finals[key]).pow(2).mean()), 1e-20)
            return baseline[key]

        def optimise(stage: str, mode: str, iterations: int, deadline: float, optimizer: torch.optim.Optimizer) -> None:
            """One training stage: random (branch, step) pairs, the cached pass of `trainer.mode` at step s with
            the updates of step s - 1, loss relative to the all-cached error (+ lambda x mean(a) when relaxed)."""
            bar = tqdm(range(iterations), desc=f"tokencache {stage}", disable=not options.progress)
            for _ in bar:
                if time.perf_counter() - start > deadline:
                    break
                key = rng.choice(pairs)
                unit = cache_error(key)
                trainer.mode, trainer.force_alpha = mode, None  # cache_error may have run a relaxed pass
                trainer.cache = recorder.updates[(key[0], key[1] - 1)]
                with torch.enable_grad():
                    replay(key)
                    cache_loss = (trainer.final - recorder.finals[key]).pow(2).mean() / unit
                    cost = trainer.alpha[..., cacheable].mean() if trainer.mode == "relaxed" else cache_loss * 0
                    loss = cache_loss + options.lambda_ * cost
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                history[stage].append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}", cache=f"{cache_loss.item():.4f}", a=f"{cost.item():.3f}")

        # Stage 1: the predictor, relaxed decisions.
        trainer.mode, trainer.predictor = "relaxed", predictor.train()
        groups = [
            {"params": predictor.block.parameters(), "lr": options.lr * 0.3},
            {"params": predictor.head.parameters(), "lr": options.lr * 3},
        ]
        train_lora = bool(options.refiners and options.lora_iterations)
        optimise(
            "predictor",
            "relaxed",
            options.iterations,
            budget * (0.75 if train_lora else 1.0),
            torch.optim.AdamW(groups, weight_decay=0.0),
        )
        predictor.eval().requires_grad_(False)

        # Stage 2: LoRA on the refiners, hard top-k decisions and token-subset runs.
        lora = None
        if train_lora:
            refiners = recorder.model_view.blocks[num_blocks - options.refiners :]
            lora = LoRA({ref.position: ref.module for ref in refiners}, options.lora_rank)
            trainer.mode, trainer.lora = "hard", lora
            optimise(
                "lora",
                "hard",
                options.lora_iterations,
                budget,
                torch.optim.AdamW(lora.parameters(), lr=options.lora_lr, weight_decay=0.0),
            )
            lora.eval().requires_grad_(False)
    finally:
        handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])

    mean_scores, fractions = _score_statistics(predictor, recorder, cacheable, options.ratio, generation.num_steps)
    beta = options.beta if options.beta is not None else default_beta(mean_scores)
    data = {
        **generation.meta,
        "guidance": generation.guidance,
        "samples": int(recorder.arguments[keys[0]][recorder.adapter.hidden_states_arg].shape[0]),
        "num_blocks": num_blocks,
        "width": recorder.width,
        "refiners": options.refiners,
        "cacheable": cacheable,
        "lora_rank": options.lora_rank if lora is not None else None,
        "lora_positions": sorted(lora.positions) if lora is not None else [],
        "lambda": options.lambda_,
        "attention": "all" if supports_full_context(recorder.model_view) else "kept",  # of the LoRA stage
        "ratio": options.ratio,
        "beta": beta,
        "mean_scores": mean_scores,
        "i_steps": istep_schedule(mean_scores, options.full_steps, beta, "eq13"),
        "full_steps": options.full_steps,
        "block_fractions": fractions,
        "iterations": [len(history["predictor"]), len(history["lora"])],
        "loss": {stage: _summary(values) for stage, values in history.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "seed": options.seed,
    }
    return TokenCacheProfile(
        method=METHOD,
        model_name=model_name or type(model).__name__,
        fingerprint=model_fingerprint(model),
        num_steps=generation.num_steps,
        data=data,
        tensors=join_tensors(predictor, lora),
    )


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    tail = max(1, len(values) // 10)
    return {"first": sum(values[:tail]) / tail, "last": sum(values[-tail:]) / tail}


@torch.no_grad()
def _score_statistics(
    predictor: torch.nn.Module, recorder: TokenCacheRecorder, cacheable: list[int], ratio: float, num_steps: int
) -> tuple[list[float], list[float]]:
    """Per step: the mean predictor score (rows, tokens, cacheable blocks, branches); per cacheable block: the
    mean Eq. 12 update fraction at `ratio` over the P-step candidates (steps >= 1)."""
    sums = [0.0] * num_steps
    counts = [0] * num_steps
    fractions = [0.0] * len(cacheable)
    pairs = 0
    for (_branch, step), arguments in sorted(recorder.block0.items()):
        scores = predictor(**arguments)[..., cacheable]
        sums[step] += float(scores.mean())
        counts[step] += 1
        if step >= 1:
            fractions = [f + g for f, g in zip(fractions, block_keep_counts(scores, ratio)[1])]
            pairs += 1
    mean_scores = [s / max(1, c) for s, c in zip(sums, counts)]
    return mean_scores, [f / max(1, pairs) for f in fractions]


def default_beta(mean_scores: list[float]) -> float:
    """The Eq. 13 smoothing stored in a profile when none is given: -2 / the spread (max - min) of the P-step
    mean scores, so exp(beta x mean score) varies by e^2 over the steps; the sign follows the paper's (negative
    for DiT: I-steps gather where the predictor asks for fewer updates)."""
    later = mean_scores[1:] or mean_scores
    spread = max(later) - min(later)
    return -2.0 / spread if spread > 1e-6 else 0.0


# ------------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class LoadedProfile:
    """What the policy needs from a TokenCache profile."""

    profile: Profile
    predictor: CachePredictor
    lora: LoRA | None
    refiners: int
    beta: float
    mean_scores: list[float]


def load_profile(view: Any, num_steps: int, path: str | None = None) -> LoadedProfile:
    """The TokenCache profile of the model behind `view` (a `ModelView`) at `num_steps`, its predictor and LoRA
    built on the model's own blocks; a clear error naming the calibration command when there is none."""
    model = view.model
    try:
        profile = Profile.load(path) if path else find_profile(METHOD, model, num_steps)
        profile.check(METHOD, model, num_steps)
    except (ProfileMismatchError, FileNotFoundError) as error:
        raise ProfileMismatchError(
            f"TokenCache needs a trained Cache Predictor for this model at {num_steps} steps: run "
            f"`ditcache calibrate tokencache --model ref-... --steps {num_steps}` (reference models) or "
            f"`ditcache.calibrate(pipe_or_model, 'tokencache', num_steps={num_steps}, ...)`. {error}"
        ) from None
    data = profile.data
    if data.get("num_blocks") != view.num_blocks:
        raise ProfileMismatchError(f"profile has {data.get('num_blocks')} blocks, the model {view.num_blocks}")
    predictor_state, lora_state = split_tensors(load_tensors(profile, Path(path) if path else None))
    block0 = view.blocks[0]
    predictor = CachePredictor(
        block0.module, int(data["width"]), view.num_blocks, block0.spec.outputs, block0.spec.token_stream
    )
    weights = f"{profile.source} (weights {data['weights']})" if "weights" in data else profile.source
    load_weights(predictor, predictor_state, weights, "predictor.")
    predictor.eval().requires_grad_(False)
    dtype = next(block0.module.parameters()).dtype
    predictor.to(dtype=dtype, device=next(block0.module.parameters()).device)
    lora = None
    if lora_state:
        positions = [int(p) for p in data["lora_positions"]]
        lora = LoRA({p: view.blocks[p].module for p in positions}, int(data["lora_rank"]))
        load_weights(lora, lora_state, weights, "lora.")
        lora.eval().requires_grad_(False)
        lora.to(device=next(block0.module.parameters()).device)
    beta = float(data.get("beta", 0.0))
    scores = [float(v) for v in data["mean_scores"]]
    if not all(math.isfinite(v) for v in scores) or len(scores) != num_steps:
        raise ProfileMismatchError(f"profile's mean_scores must hold {num_steps} finite values")
    return LoadedProfile(profile, predictor, lora, int(data["refiners"]), beta, scores)


# ------------------------------------------------------------------------------------------------- tiny models
def tiny_profile(model: torch.nn.Module, num_steps: int) -> TokenCacheProfile:
    """A quickly trained profile for a tiny test model (`ditcache.testing`): a few iterations of both stages on
    an Euler + CFG loop over `tiny_inputs` of the model's family; K = 1. For the contract suite and examples."""
    from .. import testing

    family = testing.family_of(model) if hasattr(testing, "family_of") else testing.TINY_FAMILIES[type(model)]
    inputs = testing.tiny_inputs(family)
    uncond = testing.tiny_uncond_inputs(family, inputs)

    def run(handle: Any) -> torch.Tensor:
        return testing.euler_sample(model, family, inputs, num_steps, uncond, handle=handle)

    options = TrainOptions(iterations=6, lora_iterations=3, minutes=1.0, progress=False)
    name = f"tiny-{type(model).__name__}"
    try:
        profile = train_tokencache(model, CalibrationRun(run, num_steps, 3.0), name, options)
    except ValueError as error:  # no block can run on a token subset: the policy never loads a profile there
        data = {"uncacheable": str(error), "mean_scores": [0.0] * num_steps}
        return TokenCacheProfile(METHOD, name, model_fingerprint(model), num_steps, data)
    profile.data["synthetic"] = True  # a few iterations: a working profile, not a useful predictor
    return profile
