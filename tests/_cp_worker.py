"""One rank of the context-parallel tests (tests/test_parallel_context.py starts it under torchrun, 2 ranks, gloo).

Rank 0 first samples every preset in one process (no context parallelism) and saves the outputs; then every
rank shards the model with `enable_context_parallel`, samples each preset again and writes, per rank, a JSON
with the max abs difference to the one-process output and the per-forward decision trace.

    python -m torch.distributed.run --nproc_per_node 2 tests/_cp_worker.py OUT_DIR MODEL STEPS PRESET...

MODEL is a reference model (ref-image, ref-video) or `tiny:FAMILY` (a tiny diffusers model, Euler loop).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import ditcache
from ditcache.engine.decisions import DecisionGroup, DecisionSync, Sharding
from ditcache.parallel import enable_context_parallel, init_distributed, set_decision_group
from ditcache.refmodels import RefPipeline
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

LABELS = [1, 2]


def _even_text(inputs: dict) -> dict:
    """4 of the tiny families' 5 text tokens: diffusers' context-parallel plans split the text too, and a
    split must be even over the ranks."""
    cut = {"encoder_hidden_states": 1, "encoder_attention_mask": 1, "txt_ids": 0}
    return {k: v.narrow(cut[k], 0, 4) if k in cut else v for k, v in inputs.items()}


class TinyLoop:
    """A tiny diffusers model of a family (`ditcache.testing`) sampled by a hand-written CFG Euler loop, with
    the reference pipeline's `transformer` / `__call__(..., num_inference_steps, seed)` surface."""

    def __init__(self, family: str) -> None:
        self.family, self.transformer = family, tiny_model(family)
        self.inputs = _even_text(tiny_inputs(family, batch=2, size=8))
        self.uncond = _even_text(tiny_uncond_inputs(family, self.inputs))
        self.handle = None

    def __call__(self, labels: list[int], num_inference_steps: int, seed: int) -> torch.Tensor:
        del labels, seed  # fixed inputs
        if self.handle is None:
            return self._sample(num_inference_steps)
        with self.handle.generation(num_steps=num_inference_steps):  # step-count-aware methods (TokenCache)
            return self._sample(num_inference_steps)

    def _sample(self, steps: int) -> torch.Tensor:
        return euler_sample(self.transformer, self.family, self.inputs, steps, self.uncond, handle=self.handle)


def sample(pipe: RefPipeline | TinyLoop, steps: int) -> torch.Tensor:
    return pipe(LABELS, num_inference_steps=steps, seed=3)


def banded(preset: str, world: int) -> str:
    """The one-process twin of a context-parallel run: token-level methods select in one band per rank."""
    config = ditcache.parse_policy(preset)
    return f"{preset}:token_bands={world}" if hasattr(config, "token_bands") else preset


def cached(pipe: RefPipeline, preset: str, steps: int) -> tuple[torch.Tensor, list[list], dict]:
    handle = ditcache.apply(pipe.transformer if isinstance(pipe, TinyLoop) else pipe, preset)
    if isinstance(pipe, TinyLoop):
        pipe.handle = handle  # the loop's generation / branch context (models without cache_context)
    try:
        out = sample(pipe, steps)
        trace = [
            [r.step, r.branch, r.kind, len(r.skipped_submodules), [round(f, 6) for f in r.block_fraction]]
            for r in handle.records()
        ]
        stats = handle.stats()  # a collective under context parallelism: every rank asks
        (gen,) = stats.generations
        counts = {"reused_forwards": gen.reused_forwards, "computed_forwards": gen.computed_forwards}
    finally:
        handle.remove()
        if isinstance(pipe, TinyLoop):
            pipe.handle = None
    return out, trace, counts


def shard_statistic(rank: int, world: int) -> dict:
    """A statistic that differs between shards by construction: rank r's shard changes by r + 1 times as
    much. Reduced through DecisionSync it must be the global value, the same on every rank."""
    group = dist.group.WORLD
    b = torch.ones(4 + rank, 8)  # uneven shards: 4 and 5 rows
    a = b * (1.0 + 0.1 * (rank + 1))
    shards = [(torch.ones(4 + r, 8), torch.ones(4 + r, 8) * (1.0 + 0.1 * (r + 1))) for r in range(world)]
    whole_b = torch.cat([s[0] for s in shards])
    whole_a = torch.cat([s[1] for s in shards])
    return {
        "local": ditcache.numerics.rel_l1(a, b),
        "synced": DecisionSync(DecisionGroup(group)).rel_l1(a, b),
        "global": ditcache.numerics.rel_l1(whole_a, whole_b),
    }


def learned_without_context_parallelism() -> str:
    """TokenCache's learned predictor under a sequence-parallel decision group set by hand (no diffusers
    context parallelism, so nothing to shard the predictor's attention with): the error `apply` raises."""
    model = tiny_model("flux")
    set_decision_group(model, dist.group.WORLD, Sharding.TOKENS)
    ditcache.apply(model, "omnicache-hier").remove()  # no predictor: fine
    try:
        ditcache.apply(model, "tokencache").remove()
    except TypeError as error:
        return str(error)
    return ""


def main() -> None:
    out_dir, model, steps, presets = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    info = init_distributed("gloo")
    pipe = TinyLoop(model.removeprefix("tiny:")) if model.startswith("tiny:") else RefPipeline.from_pretrained(model)
    reference_file = out_dir / "single.safetensors"
    if info.is_main:  # one process, no context parallelism: the outputs to match
        outputs, traces = {"plain": sample(pipe, steps)}, {}
        for preset in presets:
            outputs[preset], traces[preset], _ = cached(pipe, banded(preset, info.world_size), steps)
        save_file(outputs, str(reference_file))
        (out_dir / "single.json").write_text(json.dumps(traces))
    dist.barrier()
    reference = load_file(str(reference_file))
    enable_context_parallel(pipe.transformer)
    result: dict = {"plain": float((sample(pipe, steps) - reference["plain"]).abs().max()), "presets": {}}
    for preset in presets:
        out, trace, counts = cached(pipe, preset, steps)
        diff = float((out - reference[preset]).abs().max())
        result["presets"][preset] = {"max_abs_diff": diff, "trace": trace, **counts}
    result["shard_statistic"] = shard_statistic(info.rank, info.world_size)
    result["token_error"] = learned_without_context_parallelism()
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
