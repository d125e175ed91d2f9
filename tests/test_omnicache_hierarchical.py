"""OmniCache (hierarchical): matching, skip-and-refill of tokens / frames / positions, `BlockCall.run_rows`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest
import torch
from diffusers import LatteTransformer3DModel

import ditcache
from ditcache.engine.calls import BlockCall
from ditcache.engine.macs import measure_costs
from ditcache.policies.omnicache_matching import Geometry, bipartite_match, layout, matching_macs, plan_block
from ditcache.testing import TINY_MODELS, euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FRAMES = 4


@functools.cache
def latte(layers: int = 3) -> torch.nn.Module:
    """A tiny Latte with 4 frames (so frame pairs exist) and 3 layers (so a middle layer is cached)."""
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_model("latte").config.items() if not k.startswith("_")}
    return LatteTransformer3DModel(**{**config, "num_layers": layers, "video_length": FRAMES}).eval()


def latte_inputs(batch: int = 1, seed: int = 1) -> dict[str, Any]:
    return tiny_inputs("latte", batch=batch, seed=seed, frames=FRAMES)


ALL_LAYERS = dict(skip_first=0, skip_last=0)


# ------------------------------------------------------------------------------------------------ matching
def _naive_match(features: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, r: int) -> list[list[int]]:
    """Flat bipartite matching written out: per row, each source's best cosine over the destinations of its group
    (`src` (G, S), `dst` (G, D)), then the r best sources (stable)."""
    out = []
    for row in features:
        scores = []
        for g in range(src.shape[0]):
            for s in src[g].tolist():
                sims = [float(torch.nn.functional.cosine_similarity(row[s], row[d], dim=0)) for d in dst[g].tolist()]
                scores.append((s, max(sims)))
        order = sorted(range(len(scores)), key=lambda i: -scores[i][1])  # Python's sort is stable
        out.append(sorted(scores[i][0] for i in order[:r]))
    return out


def test_matching_picks_the_known_duplicates():
    geometry = Geometry((1, 4, 4), (1, 2, 2), (1, 4, 4))
    plan = layout(geometry, torch.Generator().manual_seed(3))
    assert plan.src.shape == (1, 12) and plan.dst.shape == (1, 4)  # one destination per 2x2 window
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 64, generator=g)
    duplicates = {
        0: [(plan.src[0, 1], plan.dst[0, 2]), (plan.src[0, 7], plan.dst[0, 0])],
        1: [(plan.src[0, 4], plan.dst[0, 3])],
    }
    for row, pairs in duplicates.items():
        for s, d in pairs:
            features[row, s] = 3.0 * features[row, d]  # cosine 1, whatever the scale
    match = bipartite_match(features, plan, 2)
    assert sorted(match.src[0].tolist()) == sorted(int(s) for s, _ in duplicates[0])
    assert dict(zip(match.src[0].tolist(), match.dst[0].tolist())) == {int(s): int(d) for s, d in duplicates[0]}
    assert int(match.src[1, 0]) == int(duplicates[1][0][0]) and int(match.dst[1, 0]) == int(duplicates[1][0][1])
    assert match.kept(16).shape == (2, 14)
    assert not set(match.kept(16)[0].tolist()) & set(match.src[0].tolist())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hierarchical_matching_equals_flat_matching_inside_each_group(k):
    geometry = Geometry((1, 8, 8), (1, 2, 2), (1, 8 // k, 8 // k))
    plan = layout(geometry, torch.Generator().manual_seed(k))
    features = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(5))
    match = bipartite_match(features, plan, 10)
    assert [sorted(row) for row in match.src.tolist()] == _naive_match(features, plan.src, plan.dst, 10)
    # the groups partition the grid, destinations stay inside their group
    assert sorted(torch.cat([plan.src.flatten(), plan.dst.flatten()]).tolist()) == list(range(64))
    assert matching_macs(plan, rows=3, dim=16) == 3 * k * k * (48 // (k * k)) * (16 // (k * k)) * 16


def test_k1_hierarchical_is_the_flat_layout_and_matching():
    flat = Geometry((1, 8, 8), (1, 2, 2), (1, 8, 8))
    plan = layout(flat, torch.Generator().manual_seed(0))
    features = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))
    config = ditcache.OmniCacheHierarchicalConfig(groups=1, token_ratio=0.25)
    grid = ditcache.LatentGrid(1, 8, 8)
    hier = plan_block("joint", 2, 64, grid, config)
    assert hier.token_geometry == flat and hier.token_r == 16
    assert torch.equal(
        bipartite_match(features, plan, 16).src,
        bipartite_match(features, layout(hier.token_geometry, torch.Generator().manual_seed(0)), 16).src,
    )


def test_geometry_and_config_errors_are_clear():
    with pytest.raises(ValueError, match="groups must divide the grid"):
        Geometry((1, 6, 6), (1, 2, 2), (1, 4, 4))
    with pytest.raises(ValueError, match="token_ratio must be in"):
        ditcache.OmniCacheHierarchicalConfig(token_ratio=0.8)
    with pytest.raises(ValueError, match="frame_ratio must be in"):
        ditcache.OmniCacheHierarchicalConfig(frame_ratio=0.6)
    with pytest.raises(ValueError, match="mode must be one of"):
        ditcache.OmniCacheHierarchicalConfig(mode="average")
    with pytest.raises(ValueError, match="warmup_steps must be"):
        ditcache.OmniCacheHierarchicalConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="layered_speedup must be"):
        ditcache.OmniCacheHierarchicalConfig(layered_speedup=1.0)
    with pytest.raises(ValueError, match="skip_first must be"):
        ditcache.OmniCacheHierarchicalConfig(skip_first=-1)
    assert ditcache.OmniCacheHierarchicalConfig(mode="merge", warmup_steps=0).warmup_steps == 0
    with pytest.raises(ValueError, match="groups=4 must divide"):
        plan_block("joint", 1, 36, ditcache.LatentGrid(1, 6, 6), ditcache.OmniCacheHierarchicalConfig(groups=4))


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("mode", ["refill", "merge"])
def test_ratio_zero_is_bit_exact(family, mode):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    uncond = tiny_uncond_inputs(family, inputs)
    reference = euler_sample(model, family, inputs, 4, uncond)
    config = ditcache.OmniCacheHierarchicalConfig(token_ratio=0, frame_ratio=0, block_ratio=0, mode=mode, **ALL_LAYERS)
    handle = ditcache.apply(model, config)
    try:
        assert torch.equal(euler_sample(model, family, inputs, 4, uncond, handle=handle), reference)
        assert handle.stats().last.token_fraction == 1.0
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------ refill
class _Spy:
    """Records every `run_rows` call (arguments and result) and every block's final output per step."""

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[dict[str, Any]] = []
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        original = BlockCall.run_rows

        def run_rows(call, rows, base, index=None, stream=None):
            out = original(call, rows, base, index, stream)
            stream_out = call.outputs_of(out)[call.ref.spec.token_stream]
            self.runs.append(
                dict(call=call, step=call.info.step, rows=rows, index=index, base=base.clone(), out=stream_out)
            )
            return out

        monkeypatch.setattr(BlockCall, "run_rows", run_rows)
        self.hooks = []
        for name, module in model.named_modules():
            if name.count(".") == 1 and "blocks" in name:
                self.hooks.append(module.register_forward_hook(self._hook(name)))
        self.step = 0

    def _hook(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.step is None:  # stats measuring MACs after the generation
                return
            stream = output[1] if isinstance(output, tuple) and len(output) == 2 and output[1] is not None else output
            stream = stream[0] if isinstance(stream, tuple) else stream
            self.outputs[(name, self.step)] = stream.detach().clone()

        return hook

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _run_spied(model: Any, family: str, inputs: dict[str, Any], config: Any, steps: int, monkeypatch: Any):
    spy = _Spy(model, monkeypatch)
    handle = ditcache.apply(model, config)
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    scale = 1.0 if family == "flux" else 1000.0
    try:
        with torch.no_grad(), handle.generation(num_steps=steps):
            for i in range(steps):
                spy.step = i
                t = torch.full((x.shape[0],), float(sigmas[i]) * scale)
                v = model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
                x = x + (sigmas[i + 1] - sigmas[i]) * v
        spy.step = None
        stats = handle.stats().last
    finally:
        handle.remove()
        spy.remove()
    return spy, stats


def test_refilled_tokens_equal_the_previous_steps_output_of_that_layer(monkeypatch):
    model = tiny_model("flux")
    config = ditcache.OmniCacheHierarchicalConfig(token_ratio=0.5, groups=2, **ALL_LAYERS)
    spy, stats = _run_spied(model, "flux", tiny_inputs("flux", batch=2), config, 4, monkeypatch)
    assert len(spy.runs) == 3 * 4  # steps 1-3, every block
    for run in spy.runs:
        name = run["call"].ref.name
        previous = spy.outputs[(name, run["step"] - 1)]
        assert torch.equal(run["base"], previous)  # the base is the layer's output at the previous step
        index = run["index"]
        assert run["rows"] is None and index.shape == (2, 32)
        for b in range(2):
            skipped = torch.ones(64, dtype=torch.bool)
            skipped[index[b]] = False
            assert int(skipped.sum()) == 32
            assert torch.equal(run["out"][b, skipped], previous[b, skipped])  # refilled
            assert not torch.equal(run["out"][b, ~skipped], previous[b, ~skipped])  # fresh
        assert torch.equal(spy.outputs[(name, run["step"])], run["out"])  # and the fresh output is what flows on
    assert stats.block_tokens == [64 + 3 * 32] * 4


def test_frame_and_block_caches_skip_whole_frames_and_positions(monkeypatch):
    model = latte()
    config = ditcache.OmniCacheHierarchicalConfig(frame_ratio=0.5, block_ratio=0.25, token_ratio=0.0, **ALL_LAYERS)
    spy, stats = _run_spied(model, "latte", latte_inputs(batch=2), config, 3, monkeypatch)
    grid_positions = 16  # 8x8 latent, patch 2
    spatial = [r for r in spy.runs if r["call"].ref.spec.kind == "spatial"]
    temporal = [r for r in spy.runs if r["call"].ref.spec.kind == "temporal"]
    assert len(spatial) == len(temporal) == 2 * 3  # steps 1, 2 x 3 layers
    for run, per_sample, skipped_per_sample in ((r, FRAMES, 2) for r in spatial):
        _check_whole_rows(spy, run, per_sample, skipped_per_sample)
    for run in temporal:
        _check_whole_rows(spy, run, grid_positions, 4)
    # spatial blocks: 2 of 4 frames computed after step 0; temporal: 12 of 16 positions
    spatial_tokens = 16 + 2 * 8
    temporal_tokens = FRAMES + 2 * 3
    assert stats.block_tokens == [spatial_tokens, temporal_tokens] * 3


def _check_whole_rows(spy: _Spy, run: dict[str, Any], per_sample: int, skipped: int) -> None:
    rows, out = run["rows"], run["out"]
    assert run["index"] is None  # whole rows: every token of a computed row runs
    samples = out.shape[0] // per_sample
    assert len(rows) == samples * (per_sample - skipped)
    previous = spy.outputs[(run["call"].ref.name, run["step"] - 1)]
    for b in range(samples):
        mine = rows[(rows >= b * per_sample) & (rows < (b + 1) * per_sample)]
        assert len(mine) == per_sample - skipped  # each sample skips its own r rows
    left = torch.ones(out.shape[0], dtype=torch.bool)
    left[rows] = False
    assert torch.equal(out[left], previous[left])  # skipped rows: the layer's previous output, whole
    assert not torch.equal(out[rows], previous[rows])


def test_frame_cache_skips_alternate_frames_only_and_rows_stay_independent():
    model = latte()
    config = ditcache.OmniCacheHierarchicalConfig(frame_ratio=0.5, block_ratio=0.5, token_ratio=0.25, **ALL_LAYERS)
    both = latte_inputs(batch=2)
    outs = []
    for rows in (slice(0, 2), slice(0, 1), slice(1, 2)):
        inputs = {k: (v[rows] if k in ("hidden_states", "encoder_hidden_states") else v) for k, v in both.items()}
        handle = ditcache.apply(model, config)
        outs.append(euler_sample(model, "latte", inputs, 4, handle=handle))
        handle.remove()
    torch.testing.assert_close(outs[1], outs[0][0:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0][1:2], rtol=1e-4, atol=1e-5)
    plan = plan_block("spatial", 2 * FRAMES, 16, ditcache.LatentGrid(FRAMES, 4, 4), config)
    assert plan.row_r == 2 and plan.samples == 2 and plan.token_r == 4
    pairs = layout(plan.row_geometry, torch.Generator().manual_seed(0))
    assert sorted(pairs.dst.flatten().tolist() + pairs.src.flatten().tolist()) == [0, 1, 2, 3]
    assert {f // 2 for f in pairs.dst.flatten().tolist()} == {0, 1}  # one destination in each pair of frames


def test_cfg_branches_keep_their_own_caches():
    model = latte()
    inputs = latte_inputs()
    uncond = tiny_uncond_inputs("latte", inputs)
    config = ditcache.OmniCacheHierarchicalConfig(**ALL_LAYERS)
    handle = ditcache.apply(model, config)
    euler_sample(model, "latte", inputs, 3, uncond, handle=handle)
    cond, other = handle.branch_state("cond"), handle.branch_state("uncond")
    assert set(cond.outputs) == set(other.outputs) == set(range(6))
    assert all(not torch.equal(cond.outputs[p], other.outputs[p]) for p in cond.outputs)
    handle.remove()


def test_default_layers_follow_the_paper_scaled_to_the_depth():
    def cached(model: torch.nn.Module) -> list[str]:
        handle = ditcache.apply(model, "omnicache-hier")
        names = [ref.name for ref in handle.policy.cached_layers()]
        handle.remove()
        return names

    assert cached(latte()) == ["transformer_blocks.1", "temporal_transformer_blocks.1"]  # first / last layer out
    assert cached(tiny_model("flux")) == ["transformer_blocks.1", "single_transformer_blocks.0"]  # 4 blocks: 1 + 1 out
    assert cached(latte(2)) == []


def test_merge_mode_copies_destination_outputs_to_sources(monkeypatch):
    model = tiny_model("flux")
    config = ditcache.OmniCacheHierarchicalConfig(token_ratio=0.5, mode="merge", groups=1, warmup_steps=0, **ALL_LAYERS)
    spy, stats = _run_spied(model, "flux", tiny_inputs("flux"), config, 2, monkeypatch)
    assert len(spy.runs) == 2 * 4  # no previous output needed: from step 0
    for run in spy.runs:
        out = spy.outputs[(run["call"].ref.name, run["step"])][0]
        # every skipped token's output equals some computed token's output (its destination's)
        kept = run["index"][0]
        computed = {tuple(out[i].tolist()) for i in kept.tolist()}
        skipped = sorted(set(range(64)) - set(kept.tolist()))
        assert all(tuple(out[i].tolist()) in computed for i in skipped)
    assert stats.block_tokens == [64] * 4


# ------------------------------------------------------------------------------------------------ run_rows, MACs
@dataclasses.dataclass(frozen=True)
class _RowsConfig(ditcache.PolicyConfig):
    """Test-only: after step 0 every block runs rows 0 and 2 (and, with `keep`, their first tokens)."""

    keep: int = 0


@ditcache.register_policy(_RowsConfig)
class _RowsPolicy(ditcache.Policy):
    uses_block_hooks = True

    def __init__(self, config: _RowsConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.cache: dict[int, torch.Tensor] = {}
        self.example: dict[int, dict[str, Any]] = {}
        self.result: dict[int, torch.Tensor] = {}

    def block(self, call: Any) -> Any:
        position = call.ref.position
        if call.info.step == 0:
            output = call.run()
            self.cache[position] = call.outputs_of(output)["hidden_states"]
            return output
        self.example[position] = dict(call.arguments)
        index = torch.arange(self.config.keep) if self.config.keep else None
        output = call.run_rows(torch.tensor([0, 2]), self.cache[position], index)
        self.result[position] = output
        return output


@pytest.mark.parametrize("keep", [0, 2])
def test_run_rows_matches_the_block_on_those_rows_and_macs_follow_the_executed_shape(keep):
    model = latte(2)
    steps = 3
    handle = ditcache.apply(model, _RowsConfig(keep=keep))
    euler_sample(model, "latte", latte_inputs(), steps)
    stats = handle.stats().last
    policy = handle.policy
    rows = torch.tensor([0, 2])
    block_costs, subset_costs = [], []
    for ref in policy.model_view.blocks:
        a = policy.example[ref.position]
        sliced = {
            k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[0] == a["hidden_states"].shape[0] else v)
            for k, v in a.items()
        }
        if keep:
            sliced["hidden_states"] = sliced["hidden_states"][:, :keep]
        by_hand = type(ref.module).forward(ref.module, **sliced)
        out = policy.result[ref.position]
        base = policy.cache[ref.position]
        expected = base.clone()
        if keep:
            expected[rows, :keep] = by_hand
        else:
            expected[rows] = by_hand
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        left = torch.ones(out.shape[0], dtype=torch.bool)
        left[rows] = False
        assert torch.equal(out[left], base[left])
        for costs, args in ((block_costs, a), (subset_costs, sliced)):
            costs.append(measure_costs(lambda m=ref.module, x=args: type(m).forward(m, **x), model, []).total)
    full = stats.macs_full // steps
    outside = full - sum(block_costs)
    assert stats.macs_executed == steps * outside + sum(block_costs) + (steps - 1) * sum(subset_costs)
    # executed tokens: rows 0 and 2 of 4 frames (spatial) or of 16 positions (temporal)
    spatial_rows, temporal_rows = FRAMES, 16
    tokens = keep or None
    spatial = 16 + (steps - 1) * round(2 * (tokens or 16) / spatial_rows)
    temporal = FRAMES + (steps - 1) * round(2 * (tokens or FRAMES) / temporal_rows)
    assert stats.block_tokens == [spatial, temporal, spatial, temporal]
    handle.remove()


def test_run_rows_errors_are_clear():
    errors = []

    @dataclasses.dataclass(frozen=True)
    class _BadRows(ditcache.PolicyConfig):
        pass

    @ditcache.register_policy(_BadRows)
    class _BadRowsPolicy(ditcache.Policy):
        uses_block_hooks = True

        def block(self, call: Any) -> Any:
            base = call.arguments["hidden_states"]
            for rows, b in (
                (torch.tensor([2, 1]), base),
                (torch.tensor([0.0]), base),
                (torch.tensor([99]), base),
                (torch.tensor([0]), base[:1]),
            ):
                with pytest.raises(ValueError) as info:
                    call.run_rows(rows, b)
                errors.append(str(info.value))
            assert torch.equal(call.run_rows(torch.empty(0, dtype=torch.long), base), base)
            return call.run()

    handle = ditcache.apply(latte(2), _BadRows())
    euler_sample(latte(2), "latte", latte_inputs(), 1)
    handle.remove()
    assert any("strictly increasing" in e for e in errors) and any("int64" in e for e in errors)
    assert any("rows must lie in" in e for e in errors) and any("base must hold" in e for e in errors)


def test_residual_mode_refills_input_plus_the_previous_update():
    """mode="residual": a skipped token leaves the layer as its current input plus the layer's update (output -
    input) of the previous step; computed tokens are fresh."""
    model = tiny_model("flux")
    config = ditcache.OmniCacheHierarchicalConfig(token_ratio=0.5, groups=2, mode="residual", **ALL_LAYERS)
    seen: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    step: dict[str, int | None] = {"i": 0}
    hooks = []
    for name, module in model.named_modules():
        if name.count(".") == 1 and "blocks" in name:

            def hook(module: Any, args: Any, kwargs: Any, output: Any, name: str = name) -> None:
                if step["i"] is None:  # stats measuring MACs on subset shapes after the generation
                    return
                x = kwargs.get("hidden_states", args[0] if args else None)
                out = output[1] if isinstance(output, tuple) else output
                seen[(name, step["i"])] = (x.detach().clone(), out.detach().clone())

            hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    inputs = tiny_inputs("flux", batch=2)
    handle = ditcache.apply(model, config)
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    sigmas = torch.linspace(1.0, 0.0, 5)
    try:
        with torch.no_grad(), handle.generation(num_steps=4):
            for i in range(4):
                step["i"] = i
                v = model(hidden_states=x, timestep=torch.full((2,), float(sigmas[i])), return_dict=False, **cond)[0]
                x = x + (sigmas[i + 1] - sigmas[i]) * v
        step["i"] = None
        tokens = handle.stats().last.block_tokens
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    assert tokens == [64 + 3 * 32] * 4  # half the tokens skip every layer after step 0
    for (name, i), (x_now, out_now) in seen.items():
        if i == 0:
            continue
        x_prev, out_prev = seen[(name, i - 1)]
        refilled = (out_now == x_now + (out_prev - x_prev)).all(dim=-1)  # (B, N)
        assert refilled.sum(dim=1).tolist() == [32, 32], (name, i)
