"""Image families (issue 15) end to end: real diffusers pipelines assembled from tiny components built in code.

Text encoders and tokenizers are left out (None): every pipeline here takes `prompt_embeds` /
`negative_prompt_embeds` (+ masks), so the transformer, the VAE (tiny `AutoencoderKL`, `AutoencoderDC`,
`AutoencoderKLQwenImage`) and the scheduler are the real ones and the pipeline drives the transformer exactly as
in production. Lumina2 and HiDream are driven with their pipeline's call pattern instead (said at each test).

Each pipeline runs CFG its own way, and the engine must place every forward right under each:
- PixArt-Sigma and Sana batch [uncond; cond] into one forward per step, no cache context: one branch,
  "default".
- Qwen-Image and Flux2-Klein run cond and uncond as two forwards inside `cache_context("cond")` / `("uncond")`.
- Chroma and Lumina2 run cond then uncond as two forwards per step with no cache context: the second unnamed
  forward at a timestep is its own branch ("default-2"), so the two never share a cache; Lumina2's timestep
  grows during sampling (1 - t / 1000), declared by its adapter.

Off (`none`) and after `remove()` outputs are bit-identical to the untouched pipeline; on, something is reused
(counts asserted) and executed MACs are below the full ones.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    PixArtSigmaPipeline,
    QwenImagePipeline,
    SanaPipeline,
)

import ditcache
from ditcache.applicability import applies
from ditcache.calibration.profiles import PROFILE_DIR_ENV
from ditcache.engine.engine import ENGINE_ATTR
from ditcache.testing import tiny_inputs, tiny_model, tiny_uncond_inputs, write_tiny_profiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6


def _tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    """One-level AutoencoderKL (scale factor 1)."""
    return AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        shift_factor=0.0,  # Chroma decodes with (latents / scaling_factor) + shift_factor
    ).eval()


def _runner(pipe, mask_names: tuple[str, str] = (), mask: torch.Tensor | None = None, **call):
    """`run(output_type)`: one seeded `STEPS`-step call with fixed prompt / negative embeddings (+ masks, named
    as the pipeline names them) and the pipeline's own keywords."""
    g = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    embeds = {"prompt_embeds": positive, "negative_prompt_embeds": negative}
    embeds.update({name: mask for name in mask_names})

    def run(output_type: str = "latent") -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return pipe(**embeds, **call, num_inference_steps=STEPS, generator=generator, output_type=output_type).images

    return run


def _pipeline(cls, transformer: str, vae: torch.nn.Module, scheduler):
    torch.manual_seed(0)
    model = tiny_model(transformer)
    return cls(scheduler=scheduler, vae=vae.eval(), text_encoder=None, tokenizer=None, transformer=model)


PIXART_MASKS = ("prompt_attention_mask", "negative_prompt_attention_mask")  # PixArt, Sana, Chroma


def _pixart():
    pipe = _pipeline(PixArtSigmaPipeline, "pixart", _tiny_vae(), DPMSolverMultistepScheduler())
    call = dict(negative_prompt=None, guidance_scale=4.0, height=8, width=8, use_resolution_binning=False)
    return pipe, _runner(pipe, PIXART_MASKS, torch.ones(1, 5), **call)


def _qwenimage():
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,  # the tiny transformer's 16 input channels = 4 channels packed 2x2
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = _pipeline(QwenImagePipeline, "qwenimage", vae, FlowMatchEulerDiscreteScheduler())
    masks = ("prompt_embeds_mask", "negative_prompt_embeds_mask")
    # true_cfg_scale > 1 with a negative prompt: a second, "uncond" forward per step
    call = dict(true_cfg_scale=4.0, height=32, width=32)
    return pipe, _runner(pipe, masks, torch.ones(1, 5, dtype=torch.long), **call)


def _chroma():
    # the tiny transformer's 4 input channels = 1 channel packed 2x2
    pipe = _pipeline(ChromaPipeline, "chroma", _tiny_vae(latent_channels=1), FlowMatchEulerDiscreteScheduler())
    call = dict(guidance_scale=4.0, height=16, width=16)
    return pipe, _runner(pipe, PIXART_MASKS, torch.ones(1, 5, dtype=torch.bool), **call)


def _sana():
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    pipe = _pipeline(SanaPipeline, "sana", vae, FlowMatchEulerDiscreteScheduler())
    # SanaPipeline wants multiples of 32
    call = dict(negative_prompt=None, guidance_scale=4.0, height=32, width=32, use_resolution_binning=False)
    return pipe, _runner(pipe, PIXART_MASKS, torch.ones(1, 5), **call)


def _flux2():
    vae = AutoencoderKLFlux2(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=1,  # the tiny transformer's 4 input channels = 1 channel packed 2x2
        norm_num_groups=8,
        layers_per_block=1,
    )
    pipe = _pipeline(Flux2KleinPipeline, "flux2", vae, FlowMatchEulerDiscreteScheduler())
    return pipe, _runner(pipe, guidance_scale=4.0, height=16, width=16)  # not distilled: CFG, two forwards


PIPELINES = {"pixart": (_pixart, ["default"]), "qwenimage": (_qwenimage, ["cond", "uncond"])}
PIPELINES["flux2"] = (_flux2, ["cond", "uncond"])
PIPELINES["sana"] = (_sana, ["default"])
PIPELINES["chroma"] = (_chroma, ["default", "default-2"])


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline(request):
    make, branches = PIPELINES[request.param]
    pipe, run = make()
    return request.param, pipe, run, branches, run()  # the untouched pipeline's latents


def _branches(handle) -> list[str]:
    return [record.branch for record in handle.records()]


def test_off_and_removed_are_bit_identical_to_the_untouched_pipeline(pipeline):
    name, pipe, run, branches, reference = pipeline
    handle = ditcache.apply(pipe, "none")
    try:
        cached = run()
        stats = handle.stats().last
    finally:
        handle.remove()
    assert torch.equal(cached, reference)
    assert torch.equal(run(), reference)
    assert getattr(pipe.transformer, ENGINE_ATTR, None) is None
    assert stats.steps == STEPS and stats.forwards == STEPS * len(branches)
    assert _branches(handle) == branches * STEPS  # the pipeline's CFG layout, placed step by step
    assert stats.reused_forwards == 0 and stats.macs_executed == stats.macs_full


@pytest.mark.parametrize("preset", ["static-2", "fora-2", "omnicache-hier"])
def test_caching_reuses_and_counts_macs(pipeline, preset):
    name, pipe, run, branches, reference = pipeline
    if not applies(ditcache.preset(preset), pipe.transformer):  # Sana: no token subsets (conv feed-forward)
        with pytest.raises(TypeError, match="token_subsets"):
            ditcache.apply(pipe, preset)
        return
    handle = ditcache.apply(pipe, preset)
    try:
        cached = run()
        stats = handle.stats().last
        records = handle.records()
    finally:
        handle.remove()
    assert torch.isfinite(cached).all() and cached.shape == reference.shape
    assert not torch.equal(cached, reference)
    assert stats.steps == STEPS and stats.forwards == STEPS * len(branches)
    assert 0 < stats.macs_executed < stats.macs_full
    per_branch = {b: [r.kind for r in records if r.branch == b] for b in branches}
    if preset == "static-2":  # output reuse: the same steps in every branch
        assert stats.reused_forwards == 2 * len(branches)
        assert len({tuple(kinds) for kinds in per_branch.values()}) == 1
    elif preset == "fora-2":  # block residuals: steps 3 and 5 (after 2 warm-up steps) skip every block
        assert stats.blocks_computed.count(0.0) == 2 * len(branches)
    else:  # token subsets (Chroma: its dual-stream blocks only)
        assert stats.token_fraction < 1.0
    assert torch.equal(run(), reference)


@pytest.mark.filterwarnings("ignore:MixCache. no separate unconditional branch")
def test_every_method_that_applies_runs_under_the_pipelines_cfg_layout(pipeline, tmp_path, monkeypatch):
    """One preset per method through the real pipeline (batched, named or unnamed CFG forwards): every forward
    is placed (steps x branches), MACs are counted and below the full ones, and removal restores the output."""
    import importlib

    name, pipe, run, branches, reference = pipeline
    method_presets = importlib.import_module("tests.test_families_video").METHOD_PRESETS
    presets = [p for p in method_presets if applies(ditcache.preset(p), pipe.transformer)]
    methods = {type(ditcache.preset(p)).profile_method for p in presets} - {None}
    write_tiny_profiles(tmp_path, pipe.transformer, (STEPS,), methods=sorted(methods))
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    for preset in presets:
        handle = ditcache.apply(pipe, preset)
        try:
            cached = run()
            stats = handle.stats().last
        finally:
            handle.remove()
        assert torch.isfinite(cached).all(), preset
        assert stats.steps == STEPS and stats.forwards == STEPS * len(branches), preset
        assert {record.branch for record in handle.records()} == set(branches), preset
        assert stats.macs_full > stats.macs_executed > 0, (preset, stats)
    assert torch.equal(run(), reference)


def test_decoded_images_match_with_caching_off(pipeline):
    name, pipe, run, branches, reference = pipeline
    images = run("pt")
    handle = ditcache.apply(pipe, "none")
    try:
        assert torch.equal(run("pt"), images)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------------------
def test_lumina2_call_pattern_separate_unnamed_forwards_with_growing_timesteps():
    """Lumina2Pipeline's loop, as written there (its Gemma text encoder is left out): per step, cond then uncond,
    no cache context, `timestep = 1 - t / 1000` (grows from 0 to 1), CFG combined outside the model."""
    model, inputs = tiny_model("lumina2"), tiny_inputs("lumina2")
    uncond = tiny_uncond_inputs("lumina2", inputs)
    scheduler = FlowMatchEulerDiscreteScheduler()

    @torch.no_grad()
    def sample():
        scheduler.set_timesteps(STEPS)
        latents = inputs["hidden_states"].clone()
        cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
        for t in scheduler.timesteps:
            current = (1 - t / scheduler.config.num_train_timesteps).expand(latents.shape[0])
            v = model(hidden_states=latents, timestep=current, return_dict=False, **cond)[0]
            u = model(hidden_states=latents, timestep=current, return_dict=False, **uncond)[0]
            latents = scheduler.step(-(u + 4.0 * (v - u)), t, latents, return_dict=False)[0]
        return latents

    reference = sample()
    handle = ditcache.apply(model, "fora-2")
    try:
        cached, again = sample(), sample()  # a second call is detected as a new generation
        stats = handle.stats()
    finally:
        handle.remove()
    assert [g.steps for g in stats.generations] == [STEPS, STEPS]
    assert [r.branch for r in handle.records()][: 2 * STEPS] == ["default", "default-2"] * STEPS
    assert stats.last.blocks_computed.count(0.0) == 4 and stats.last.macs_executed < stats.last.macs_full
    assert torch.equal(cached, again) and not torch.equal(cached, reference)
    assert torch.equal(sample(), reference)


def test_hidream_call_pattern_batched_cfg_with_timesteps_keyword():
    """HiDreamImagePipeline's loop (its four text encoders left out): [uncond; cond] latents in one forward,
    `timesteps=` (not `timestep`), t falling from 1000, no cache context."""
    model = tiny_model("hidream")
    inputs = tiny_inputs("hidream", batch=2)
    latents = inputs.pop("hidden_states")[:1]
    handle = ditcache.apply(model, "fora-2")
    try:
        with torch.no_grad():
            for t in torch.linspace(1000, 0, STEPS + 1)[:-1]:
                both = torch.cat([latents] * 2)
                out = model(hidden_states=both, timesteps=t.expand(2), return_dict=False, **inputs)[0]
                u, v = out.chunk(2)
                latents = latents - (u + 4.0 * (v - u)) / STEPS
        stats = handle.stats().last
    finally:
        handle.remove()
    assert stats.steps == STEPS and stats.forwards == STEPS
    assert {r.branch for r in handle.records()} == {"default"}
    assert stats.blocks_computed.count(0.0) == 2 and stats.macs_executed < stats.macs_full
    assert torch.isfinite(latents).all()


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sana", "lumina2", "hidream"])
@pytest.mark.parametrize("preset", ["tokencache", "omnicache-hier"])
def test_token_subset_methods_refuse_full_grid_families_up_front(family, preset):
    model = tiny_model(family)
    assert not applies(ditcache.preset(preset), model)
    with pytest.raises(TypeError, match=f"does not apply to {type(model).__name__}.*token_subsets"):
        ditcache.apply(model, preset)
    assert getattr(model, ENGINE_ATTR, None) is None


def test_run_tokens_names_the_family_and_the_method_on_a_full_grid_block():
    """A policy that asks Sana's conv feed-forward block for a token subset gets a clear error, not a shape error
    deep inside GLUMBConv or a silently wrong result."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class HalfTokensConfig(ditcache.PolicyConfig):
        pass

    @ditcache.register_policy(HalfTokensConfig)
    class HalfTokensPolicy(ditcache.Policy):
        uses_block_hooks = True

        def block(self, call):
            stream = call.arguments["hidden_states"]
            return call.run_tokens(torch.arange(stream.shape[1] // 2), stream)

    model, inputs = tiny_model("sana"), tiny_inputs("sana")
    handle = ditcache.apply(model, HalfTokensConfig())
    try:
        with pytest.raises(TypeError, match="HalfTokensPolicy runs blocks on token subsets.*sana adapter.*GLUMBConv"):
            model(timestep=torch.tensor([500.0]), **inputs)
    finally:
        handle.remove()


def test_models_command_lists_the_image_families_with_their_methods(capsys):
    from ditcache.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for cls in ("PixArtTransformer2DModel", "QwenImageTransformer2DModel", "ChromaTransformer2DModel"):
        assert f"{cls} [" in out
    sana = out[out.index("SanaTransformer2DModel [") :].split("\n")
    assert sana[2].startswith("    presets: all but") and "tokencache" in sana[3] and "GLUMBConv" in sana[3]


# ------------------------------------------------------------------------------------------------------------
IMAGE = ("pixart", "sana", "qwenimage", "chroma", "flux2", "lumina2", "hidream", "cogview4", "auraflow", "hunyuanimage")
NO_TOKEN_SUBSETS = ("sana", "lumina2", "hidream", "hunyuanimage")


@pytest.mark.parametrize("family", IMAGE)
def test_every_method_that_applies_reuses_something_and_counts_macs(family, tmp_path, monkeypatch):
    """One preset per method (`tests/test_families_video.py`'s list), through the contract's pipeline-like loop;
    the calibrated ones read tiny profiles written for the model."""
    import importlib

    generate = importlib.import_module("tests.test_contract").generate
    method_presets = importlib.import_module("tests.test_families_video").METHOD_PRESETS
    model, inputs = tiny_model(family), tiny_inputs(family)
    uncond = tiny_uncond_inputs(family, inputs)
    presets = [p for p in method_presets if applies(ditcache.preset(p), model)]
    methods = {type(ditcache.preset(p)).profile_method for p in presets} - {None}
    write_tiny_profiles(tmp_path, model, (6,), methods=sorted(methods))
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    for preset in presets:
        handle = ditcache.apply(model, preset)
        try:
            out = generate(model, family, inputs, STEPS, uncond, handle=handle)
            stats = handle.stats().last
        finally:
            handle.remove()
        assert torch.isfinite(out).all(), preset
        assert stats.forwards == 2 * STEPS and stats.macs_full > stats.macs_executed > 0, (preset, stats)
    skipped = {"omnicache-hier", "tokencache-fast"} if family in NO_TOKEN_SUBSETS else set()
    skipped |= {"omnicache-traj-fast"} if family == "hidream" else set()  # attention / MLP nested in HiDreamBlock
    assert set(method_presets) - set(presets) == skipped
