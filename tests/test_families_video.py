"""Video families (HunyuanVideo, CogVideoX, LTX-Video, Mochi, Allegro, SkyReels-V2, Cosmos): what each adapter
declares (token grid, modulated input, token subsets, trial-forward limits) and how each pipeline drives the
transformer (CFG batched or in two forwards, with or without `cache_context`), checked on the tiny models.

The contract suite (tests/test_contract.py) runs every preset on these families; the real pipelines of Wan 2.2,
CogVideoX, HunyuanVideo and LTX are in tests/test_families_video_pipelines.py. The pipelines whose text encoders
or VAEs are not built here (Mochi, Allegro, SkyReels-V2, Cosmos) are driven below with exactly their denoising
loop's transformer calls: argument names, CFG layout, `cache_context` names and step hints, timestep direction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import torch

import ditcache
from ditcache.adapters import adapter_for
from ditcache.adapters.resize import strided_token_index
from ditcache.applicability import applies
from ditcache.calibration.profiles import PROFILE_DIR_ENV
from ditcache.engine.binding import BoundCall
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs, write_tiny_profiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VIDEO = ("hunyuan-video", "cogvideox", "ltx", "mochi", "allegro", "skyreels-v2", "cosmos")
NO_TOKEN_SUBSETS = ("hunyuan-video", "allegro")


def _first_block(model: torch.nn.Module) -> torch.nn.Module:
    spec = adapter_for(model).block_lists[0]
    return getattr(model, spec.attr)[0]


@pytest.mark.parametrize("family", VIDEO)
def test_grid_and_modulated_input_match_what_the_first_block_sees(family):
    """The adapter's token grid counts the block's token stream; its modulated input is exactly what the first
    block feeds its self-attention."""
    model, inputs = tiny_model(family), tiny_inputs(family, batch=2)
    block = _first_block(model)
    adapter = adapter_for(model)
    attention = getattr(block, adapter.block_lists[0].attention[0])
    seen: dict[str, Any] = {}

    def record_block(module, args, kwargs):
        seen.setdefault("block", BoundCall(type(module), args, kwargs).arguments)

    def record_attention(module, args, kwargs):
        seen.setdefault("attn", args[0] if args else kwargs["hidden_states"])

    hooks = [
        block.register_forward_pre_hook(record_block, with_kwargs=True),
        attention.register_forward_pre_hook(record_attention, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(timestep=torch.full((2,), 500.0), **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    arguments = seen["block"]
    grid = adapter.grid(model, {**inputs, "timestep": torch.full((2,), 500.0)})
    assert arguments["hidden_states"].shape[:2] == (2, grid.num_tokens)
    with torch.no_grad():
        modulated = adapter.modulated_input(block, arguments)
    torch.testing.assert_close(modulated.to(seen["attn"].dtype), seen["attn"])


@pytest.mark.parametrize("family", NO_TOKEN_SUBSETS)
@pytest.mark.parametrize("preset", ["omnicache-hier", "tokencache"])
def test_token_subset_methods_raise_where_blocks_cannot_run_on_a_subset(family, preset):
    with pytest.raises(TypeError, match="subset of its tokens"):
        ditcache.apply(tiny_model(family), preset)


@dataclasses.dataclass(frozen=True)
class _SubsetProbeConfig(ditcache.PolicyConfig):
    """Test-only: at step 1 every block also runs on all its tokens and on 5 random tokens per row."""

    seed: int = 0


@ditcache.register_policy(_SubsetProbeConfig)
class _SubsetProbePolicy(ditcache.Policy):
    uses_block_hooks = True

    def __init__(self, config: _SubsetProbeConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.seen: list[tuple[Any, ...]] = []

    def block(self, call: Any) -> Any:
        if call.info.step != 1:
            return call.run()
        stream = call.arguments["hidden_states"]
        batch, tokens = stream.shape[:2]
        g = torch.Generator().manual_seed(call.ref.position)
        index = torch.stack([torch.randperm(tokens, generator=g)[:5] for _ in range(batch)])
        base = torch.randn(stream.shape, generator=g)
        full = call.run()
        everything = call.outputs_of(call.run_tokens(torch.arange(tokens), base))["hidden_states"]
        subset = call.outputs_of(call.run_tokens(index, base))["hidden_states"]
        self.seen.append((call.outputs_of(full)["hidden_states"], everything, index, subset))
        return full


@pytest.mark.parametrize("family", [f for f in VIDEO if f not in NO_TOKEN_SUBSETS])
def test_token_subsets_all_tokens_is_run_and_rows_are_independent(family):
    """Per-token arguments (rotary tables with or without a batch axis, per-token modulation) are gathered so
    that all tokens is exactly `run()`, and row 0 of a per-row subset run ignores row 1's input."""
    model = tiny_model(family)
    runs = []
    for change_row_1 in (False, True):
        inputs = tiny_inputs(family, batch=2)
        if change_row_1:
            inputs["hidden_states"][1] = torch.randn_like(inputs["hidden_states"][1])
        handle = ditcache.apply(model, _SubsetProbeConfig())
        try:
            euler_sample(model, family, inputs, 2)
            runs.append(handle.policy.seen)
        finally:
            handle.remove()
    assert len(runs[0]) == len(runs[1]) > 0
    for (full, everything, index_a, a), (_, _, index_b, b) in zip(*runs):
        assert torch.equal(full, everything)
        assert torch.equal(index_a[0], index_b[0])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)


def test_strided_token_index_picks_the_first_token_of_each_pooled_cell():
    index = strided_token_index((2, 4, 4), (1, 2, 2))
    assert index.tolist() == [0, 2, 8, 10]
    with pytest.raises(ValueError, match="must divide"):
        strided_token_index((3, 4, 4), (2, 2, 2))


def test_cogvideox_trial_forward_takes_the_rotary_table_of_the_sub_grid():
    model, inputs = tiny_model("cogvideox"), tiny_inputs("cogvideox")  # 3 x 4 x 4 tokens, patch 2
    adapter = adapter_for(model)
    small = adapter.grid(model, inputs).__class__(frames=3, height=4, width=4, patch=(1, 2, 2))  # latent 8 -> 4
    resized = adapter.resized_kwargs(inputs, small)["image_rotary_emb"]
    index = strided_token_index((3, 4, 4), (3, 2, 2))
    for table, full in zip(resized, inputs["image_rotary_emb"]):
        assert torch.equal(table, full[index])


@pytest.mark.parametrize(
    ("family", "per_token"),
    [
        ("ltx", {"timestep": torch.full((1, 48), 500.0)}),  # LTX image-to-video: per-token timesteps
        ("skyreels-v2", {"timestep": torch.full((1, 3), 500.0), "enable_diffusion_forcing": True}),
    ],
)
def test_trial_forwards_raise_on_per_token_timesteps(family, per_token):
    model = tiny_model(family)
    adapter = adapter_for(model)
    arguments = {**tiny_inputs(family), **per_token}
    with pytest.raises(ValueError, match="per-(token|frame) timesteps"):
        adapter.resized_kwargs(arguments, adapter.grid(model, arguments))


# ------------------------------------------------------------------------------------------------ pipelines
# Each driver is the denoising loop's transformer calls of that pipeline (diffusers 0.42), on the tiny model.
@torch.no_grad()
def _mochi_loop(model, inputs, uncond, steps):
    """MochiPipeline: [uncond; cond] batched in cache_context("cond_uncond"), no step hints; its timesteps grow
    (t = 1000 * (1 - sigma), the scheduler inverts the sigmas)."""
    x = inputs["hidden_states"]
    both = {k: torch.cat([uncond[k], inputs[k]]) for k in ("encoder_hidden_states", "encoder_attention_mask")}
    for sigma in torch.linspace(1.0, 1.0 / steps, steps):
        t = (1000.0 * (1 - sigma)).expand(2)
        with model.cache_context("cond_uncond"):
            out = model(hidden_states=torch.cat([x, x]), timestep=t, return_dict=False, **both)[0]
        u, c = out.chunk(2)
        x = x - (u + 3.0 * (c - u)) / steps
    return x


@torch.no_grad()
def _allegro_loop(model, inputs, uncond, steps):
    """AllegroPipeline: [uncond; cond] batched, no cache_context at all: steps come from the timestep."""
    x = inputs["hidden_states"]
    text = torch.cat([uncond["encoder_hidden_states"], inputs["encoder_hidden_states"]])
    for t in torch.linspace(999.0, 999.0 / steps, steps):
        out = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=text, timestep=t.expand(2))
        u, c = out.sample.chunk(2)
        x = x - (u + 3.0 * (c - u)) / steps
    return x


@torch.no_grad()
def _skyreels_loop(model, inputs, uncond, steps):
    """SkyReelsV2Pipeline: cache_context("cond") then ("uncond") around two forwards, no step hints."""
    x = inputs["hidden_states"]
    for t in torch.linspace(1000.0, 1000.0 / steps, steps):
        with model.cache_context("cond"):
            c = model(hidden_states=x, timestep=t.expand(1), return_dict=False, **_text(inputs))[0]
        with model.cache_context("uncond"):
            u = model(hidden_states=x, timestep=t.expand(1), return_dict=False, **_text(uncond))[0]
        x = x - (u + 3.0 * (c - u)) / steps
    return x


@torch.no_grad()
def _cosmos_loop(model, inputs, uncond, steps):
    """Cosmos2VideoToWorldPipeline: cond, then uncond, as two forwards at one timestep, no cache_context (the
    model has none): the engine tells them apart by their order within the step."""
    x = inputs["hidden_states"]
    for t in torch.linspace(1.0, 1.0 / steps, steps):
        c = model(hidden_states=x, timestep=t.expand(1), return_dict=False, **_text(inputs))[0]
        u = model(hidden_states=x, timestep=t.expand(1), return_dict=False, **_text(uncond))[0]
        x = x - (u + 3.0 * (c - u)) / steps
    return x


def _text(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"encoder_hidden_states": inputs["encoder_hidden_states"]}


LOOPS = {
    "mochi": (_mochi_loop, ["cond_uncond"]),
    "allegro": (_allegro_loop, ["default"]),
    "skyreels-v2": (_skyreels_loop, ["cond", "uncond"]),
    "cosmos": (_cosmos_loop, ["default", "default-2"]),
}


@pytest.mark.parametrize("family", list(LOOPS))
def test_pipeline_call_pattern_places_steps_and_branches(family):
    """Caching off is exact; FORA reuses the same steps in every branch; a second call (no reset) is a new
    generation; branches are the pipeline's (batched CFG = one branch, unnamed forwards = one branch each)."""
    loop, branches = LOOPS[family]
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    uncond = {**inputs, **tiny_uncond_inputs(family, inputs)}
    reference = loop(model, inputs, uncond, 6)
    handle = ditcache.apply(model, "none")
    try:
        assert torch.equal(loop(model, inputs, uncond, 6), reference)
    finally:
        handle.remove()
    handle = ditcache.apply(model, "fora-2")
    try:
        first = loop(model, inputs, uncond, 6)
        second = loop(model, inputs, uncond, 6)
        stats = handle.stats()
        records = handle.records()
    finally:
        handle.remove()
    assert torch.equal(first, second) and not torch.equal(first, reference)
    assert [(g.steps, g.forwards) for g in stats.generations] == [(6, 6 * len(branches))] * 2
    assert [r.branch for r in records[: len(branches) * 6]] == branches * 6
    blocks = stats.last.blocks_total
    per_step = [blocks] * 3 + [0, blocks, 0]  # warm-up 0, 1; compute 2, 4; reuse block residuals at 3, 5
    assert stats.last.blocks_computed == [b for b in per_step for _ in branches]
    assert stats.last.macs_full > stats.last.macs_executed > 0
    assert torch.equal(loop(model, inputs, uncond, 6), reference)


def test_mochi_without_the_growing_timestep_rule_would_restart_every_step():
    """Why the Mochi adapter declares `timesteps_increase`: read as falling timesteps, every step of
    MochiPipeline's loop would look like a new generation."""
    model, inputs = tiny_model("mochi"), tiny_inputs("mochi")
    uncond = {**inputs, **tiny_uncond_inputs("mochi", inputs)}
    handle = ditcache.apply(model, "none")
    try:
        _mochi_loop(model, inputs, uncond, 4)
        assert [g.steps for g in handle.stats().generations] == [4]
    finally:
        handle.remove()
    assert adapter_for(model).timesteps_increase


def test_unnamed_cfg_forwards_keep_separate_caches():
    """Cosmos' cond and uncond forwards carry no names; each keeps its own cache (static reuse returns each
    branch's own output, never the other's)."""
    model, inputs = tiny_model("cosmos"), tiny_inputs("cosmos")
    uncond = {**inputs, **tiny_uncond_inputs("cosmos", inputs)}
    outputs = []
    hook = model.register_forward_hook(lambda mod, args, out: outputs.append(out[0].clone()))
    handle = ditcache.apply(model, "static-2:warmup_steps=1")
    try:
        with contextlib.ExitStack():
            _cosmos_loop(model, inputs, uncond, 4)
        reused = handle.stats().last.reused
    finally:
        handle.remove()
        hook.remove()
    assert reused == [(2, "default"), (2, "default-2")]
    assert torch.equal(outputs[4], outputs[2]) and torch.equal(outputs[5], outputs[3])  # step 2 = step 1, per branch
    assert not torch.equal(outputs[4], outputs[5])


# One preset per method, the one that reuses most; the calibrated ones read tiny profiles written for the model.
METHOD_PRESETS = (
    "static-4",
    "fora-4",
    "teacache-0.3",
    "precisecache-flash",
    "mixcache-eff",
    "omnicache-traj-fast",
    "omnicache-hier",
    "omnicache-layered-3x",
    "tokencache-fast",
    "auto",
)


@pytest.mark.parametrize("family", VIDEO)
def test_every_method_that_applies_reuses_something_and_counts_macs(family, tmp_path, monkeypatch):
    import importlib

    generate = importlib.import_module("tests.test_contract").generate  # the contract's pipeline-like loop
    model, inputs = tiny_model(family), tiny_inputs(family)
    uncond = tiny_uncond_inputs(family, inputs)
    presets = [p for p in METHOD_PRESETS if applies(ditcache.preset(p), model)]
    methods = {type(ditcache.preset(p)).profile_method for p in presets} - {None}
    write_tiny_profiles(tmp_path, model, (6,), methods=sorted(methods))
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    for preset in presets:
        handle = ditcache.apply(model, preset)
        try:
            out = generate(model, family, inputs, 6, uncond, handle=handle)
            stats = handle.stats().last
        finally:
            handle.remove()
        assert torch.isfinite(out).all(), preset
        assert stats.forwards == 12 and stats.macs_full > stats.macs_executed > 0, (preset, stats)
    expected = len(METHOD_PRESETS) - (2 if family in NO_TOKEN_SUBSETS else 0)  # omnicache-hier, tokencache
    assert len(presets) == expected
