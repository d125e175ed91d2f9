"""End to end through real diffusers video pipelines assembled from tiny components built in code: Wan 2.2 (two
transformers switched at a boundary timestep), CogVideoX (batched CFG), HunyuanVideo (true CFG as two forwards),
LTX-Video (batched CFG, packed latents).

The text encoders are left out (`tokenizer=None`, `text_encoder=None`): every pipeline takes `prompt_embeds` /
`negative_prompt_embeds` (and masks / pooled embeddings) directly, so the transformer, scheduler, VAE and the
pipeline's own denoising loop (CFG layout, `cache_context` names and step hints) are the real ones. Caching off
(`none`) or removed is bit-identical to the untouched pipeline; caching on reuses what the counts say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    LTXPipeline,
    WanPipeline,
)

import ditcache
from ditcache.engine.engine import ENGINE_ATTR
from ditcache.engine.handle import PipelineCacheHandle
from ditcache.testing import tiny_model
from ditcache.tiny.wan import tiny_wan_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6


def _text(seed: int, length: int = 5, width: int = 16) -> torch.Tensor:
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


def wan22_pipeline(boundary_ratio: float = 0.55) -> WanPipeline:
    """Wan 2.2 A14B layout: `transformer` (high noise) and `transformer_2` (low noise), two tiny Wan models with
    different weights; with 6 flow-matching steps (timesteps 1000, 800, 600, 401, 201, 1) and boundary 0.55 the
    high-noise expert runs steps 0-2 and the low-noise one steps 3-5."""
    vae = tiny_wan_vae()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        transformer=tiny_model("wan", seed=0),
        transformer_2=tiny_model("wan", seed=1),
        boundary_ratio=boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan22_call(pipe: WanPipeline) -> torch.Tensor:
    return pipe(
        prompt_embeds=_text(1),
        negative_prompt_embeds=_text(2),
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).frames


def cogvideox_pipeline() -> CogVideoXPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    transformer, scheduler = tiny_model("cogvideox"), CogVideoXDDIMScheduler()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cogvideox_call(pipe: CogVideoXPipeline) -> torch.Tensor:
    return pipe(
        prompt_embeds=_text(1),
        negative_prompt_embeds=_text(2),
        height=16,
        width=16,
        num_frames=9,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).frames


def hunyuan_pipeline() -> HunyuanVideoPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 2,
        up_block_types=("HunyuanVideoUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_model("hunyuan-video"),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hunyuan_call(pipe: HunyuanVideoPipeline, true_cfg: bool = True) -> torch.Tensor:
    mask = torch.ones(1, 5, dtype=torch.long)
    negative = {}
    if true_cfg:  # true CFG: a second forward per step with the negative prompt
        negative = dict(
            negative_prompt_embeds=_text(2),
            negative_pooled_prompt_embeds=torch.randn(1, 8, generator=torch.Generator().manual_seed(5)),
            negative_prompt_attention_mask=mask,
            true_cfg_scale=3.0,
        )
    return pipe(
        prompt_embeds=_text(1),
        pooled_prompt_embeds=torch.randn(1, 8, generator=torch.Generator().manual_seed(4)),
        prompt_attention_mask=mask,
        height=16,
        width=16,
        num_frames=9,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        **negative,
    ).frames


def ltx_pipeline() -> LTXPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_model("ltx"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ltx_call(pipe: LTXPipeline) -> torch.Tensor:
    mask = torch.ones(1, 5, dtype=torch.long)
    return pipe(
        prompt_embeds=_text(1),
        prompt_attention_mask=mask,
        negative_prompt_embeds=_text(2),
        negative_prompt_attention_mask=mask,
        guidance_scale=3.0,
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).frames


# (build, call, CFG branch names the pipeline gives, forwards per step)
PIPELINES: dict[str, tuple[Callable[[], Any], Callable[[Any], torch.Tensor], list[str]]] = {
    "cogvideox": (cogvideox_pipeline, _cogvideox_call, ["cond_uncond"]),  # batched: one forward on [uncond; cond]
    "hunyuan-video": (hunyuan_pipeline, _hunyuan_call, ["cond", "uncond"]),  # true CFG: two forwards
    "ltx": (ltx_pipeline, _ltx_call, ["cond_uncond"]),  # batched
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_cached_and_uncached(name):
    build, call, branches = PIPELINES[name]
    pipe = build()
    reference = call(pipe)
    for preset in ("none", "fora-2"):
        handle = ditcache.apply(pipe, preset)
        try:
            out = call(pipe)
            stats = handle.stats().last
            records = handle.records()
        finally:
            handle.remove()
        assert getattr(pipe.transformer, ENGINE_ATTR, None) is None
        assert [r.branch for r in records] == branches * STEPS  # the pipeline's own CFG layout and names
        assert stats.steps == STEPS and stats.forwards == len(branches) * STEPS
        blocks = stats.blocks_total
        if preset == "none":
            assert torch.equal(out, reference)
            assert stats.macs_executed == stats.macs_full > 0
        else:  # FORA: warm-up steps 0, 1; then compute 2 and 4, reuse every block residual at 3 and 5
            per_step = [blocks] * 3 + [0, blocks, 0]
            assert stats.blocks_computed == [b for b in per_step for _ in branches]
            assert stats.macs_full > stats.macs_executed > 0
            assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert torch.equal(call(pipe), reference)  # removed: exactly the untouched pipeline


def test_hunyuan_embedded_guidance_runs_one_forward_per_step():
    """Without a negative prompt HunyuanVideo's pipeline runs only the cond forward (the guidance-distilled model
    embeds the guidance scale): one branch, reused as a whole."""
    pipe = hunyuan_pipeline()
    reference = _hunyuan_call(pipe, true_cfg=False)
    handle = ditcache.apply(pipe, "static-2:warmup_steps=1")
    try:
        _hunyuan_call(pipe, true_cfg=False)
        stats = handle.stats().last
    finally:
        handle.remove()
    assert stats.forwards == STEPS and {branch for _, branch in stats.reused} == {"cond"}
    assert stats.reused_steps == [2, 4]
    assert torch.equal(_hunyuan_call(pipe, true_cfg=False), reference)


def test_wan22_caches_both_transformers_with_their_own_state():
    pipe = wan22_pipeline()
    reference = _wan22_call(pipe)
    handle = ditcache.apply(pipe, "static-2:warmup_steps=0")  # compute even steps, reuse odd ones
    try:
        assert isinstance(handle, PipelineCacheHandle) and set(handle.handles) == {"transformer", "transformer_2"}
        assert getattr(pipe.transformer, ENGINE_ATTR) is not getattr(pipe.transformer_2, ENGINE_ATTR)
        out = _wan22_call(pipe)
        high, low = handle["transformer"].records(), handle["transformer_2"].records()
        per_model = handle.stats_per_model()
        total = handle.stats().last
    finally:
        handle.remove()
    assert [(r.step, r.branch, r.kind) for r in high] == [
        (0, "cond", "computed"),
        (0, "uncond", "computed"),
        (1, "cond", "reused"),
        (1, "uncond", "reused"),
        (2, "cond", "computed"),
        (2, "uncond", "computed"),
    ]
    # Step 3 is odd (a reuse step) but the first of the low-noise expert: it has nothing of its own cached and
    # never reads the high-noise expert's output, so it computes.
    assert [(r.step, r.branch, r.kind) for r in low] == [
        (3, "cond", "computed"),
        (3, "uncond", "computed"),
        (4, "cond", "computed"),
        (4, "uncond", "computed"),
        (5, "cond", "reused"),
        (5, "uncond", "reused"),
    ]
    assert per_model["transformer"].last.steps == per_model["transformer_2"].last.steps == 3
    assert (total.steps, total.forwards, total.reused_forwards) == (6, 12, 4)
    assert total.macs_full == per_model["transformer"].last.macs_full + per_model["transformer_2"].last.macs_full
    assert total.macs_full > total.macs_executed > 0
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    for model in (pipe.transformer, pipe.transformer_2):
        assert getattr(model, ENGINE_ATTR, None) is None
    assert torch.equal(_wan22_call(pipe), reference)


@pytest.mark.parametrize("preset", ["none", "fora-2", "teacache-0.2"])
def test_wan22_off_is_exact_on_reuses_and_second_call_starts_clean(preset):
    pipe = wan22_pipeline()
    reference = _wan22_call(pipe)
    handle = ditcache.apply(pipe, preset)
    try:
        first = _wan22_call(pipe)
        second = _wan22_call(pipe)  # a new generation in both experts, without a reset
        stats = handle.stats()
        per_model = handle.stats_per_model()
    finally:
        handle.remove()
    assert torch.equal(first, second)
    assert [len(s.generations) for s in per_model.values()] == [2, 2]
    assert [g.forwards for g in stats.generations] == [12, 12]
    if preset == "none":
        assert torch.equal(first, reference) and stats.last.macs_executed == stats.last.macs_full
    else:
        assert stats.last.macs_executed < stats.last.macs_full
    assert torch.equal(_wan22_call(pipe), reference)


def test_wan22_apply_is_all_or_nothing():
    pipe = wan22_pipeline()
    own = ditcache.apply(pipe.transformer_2, "fora-2")  # the low-noise expert is already cached
    try:
        with pytest.raises(RuntimeError, match="already applied"):
            ditcache.apply(pipe, "fora-2")
        assert getattr(pipe.transformer, ENGINE_ATTR, None) is None  # rolled back
    finally:
        own.remove()
    handle = ditcache.apply(pipe, "fora-2")
    handle.remove()
    handle.remove()  # safe twice
    assert not handle.active
    with pytest.raises(TypeError, match=r"handle\[name\]"):
        handle.branch_state("cond")
