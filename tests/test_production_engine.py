"""Production use of the engine (issue 18, part A): one transformer shared by threads, samplers that evaluate
the model more than once per step (Heun), bounded records of a long-lived handle, and an aspect-ratio change
with the same token count."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PixArtSigmaPipeline,
    UniPCMultistepScheduler,
    WanPipeline,
)

import ditcache
from ditcache.adapters.flux import flux_image_ids
from ditcache.engine.handle import PipelineCacheHandle
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs
from ditcache.tiny.wan import tiny_wan_vae

from .test_families_image import PIXART_MASKS, _pipeline, _runner, _tiny_vae
from .test_families_video_pipelines import _text

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ threads
def _jobs(family: str, thread: int, generations: int) -> list[dict]:
    """Each thread's generations: other prompts and latents per thread and per generation."""
    jobs = []
    for g in range(generations):
        inputs = tiny_inputs(family, seed=10 * thread + g + 1)
        jobs.append({"inputs": inputs, "cfg_inputs": tiny_uncond_inputs(family, inputs)})
    return jobs


def _run_jobs(model, family: str, jobs: list[dict], steps: int, handle=None) -> list[torch.Tensor]:
    outputs = []
    for job in jobs:
        if handle is not None and not hasattr(type(model), "cache_context"):
            with handle.generation(num_steps=steps):  # the explicit API, in the thread that samples
                outputs.append(euler_sample(model, family, job["inputs"], steps, job["cfg_inputs"], handle=handle))
        else:
            outputs.append(euler_sample(model, family, job["inputs"], steps, job["cfg_inputs"], handle=handle))
    return outputs


def _run_in_lockstep(model, family: str, per_thread: list[list[dict]], steps: int, handle) -> list[list]:
    """Every thread's k-th forward waits for the others' k-th forward, so generations interleave forward by
    forward (the worst case for state kept per model)."""
    barrier = threading.Barrier(len(per_thread), timeout=60)

    def wait(module: torch.nn.Module, args: tuple) -> None:
        barrier.wait()

    hook = model.register_forward_pre_hook(wait)
    results: list[list | BaseException] = [[] for _ in per_thread]

    def work(index: int) -> None:
        try:
            results[index] = _run_jobs(model, family, per_thread[index], steps, handle)
        except BaseException as error:  # reported by the main thread below
            barrier.abort()
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(per_thread))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hook.remove()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.mark.parametrize(
    "family, preset", [("flux", "fora-2"), ("flux", "teacache-0.1"), ("flux", "static-2"), ("dit", "fora-2")]
)
def test_two_threads_sharing_one_model_equal_sequential_runs(family, preset):
    steps, generations = 5, 3
    model = tiny_model(family)
    per_thread = [_jobs(family, thread, generations) for thread in range(2)]

    sequential = ditcache.apply(model, preset)
    expected = [_run_jobs(model, family, jobs, steps, sequential) for jobs in per_thread]
    expected_work = sorted(_work(g) for g in sequential.stats().generations)
    sequential.remove()

    handle = ditcache.apply(model, preset)
    threaded = _run_in_lockstep(model, family, per_thread, steps, handle)
    for got, want in zip(threaded, expected):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    stats = handle.stats()
    assert len(stats.generations) == 2 * generations
    assert all(g.forwards == 2 * steps and g.steps == steps for g in stats.generations)
    assert sorted(_work(g) for g in stats.generations) == expected_work
    # The preset does reuse (forwards or blocks), so shared state would have shown.
    assert all(computed < forwards * stats.generations[0].blocks_total for _, computed, forwards in expected_work)
    handle.remove()


def _work(generation) -> tuple[int, float, int]:
    return generation.reused_forwards, sum(generation.blocks_computed), generation.forwards


def test_each_thread_gets_its_own_policy_and_main_thread_keeps_the_first():
    model = tiny_model("flux")
    handle = ditcache.apply(model, "teacache-0.1")
    first = handle.policy
    inputs = tiny_inputs("flux")
    euler_sample(model, "flux", inputs, 4)
    seen = {}

    def other() -> None:
        euler_sample(model, "flux", inputs, 4)
        seen["policy"] = handle.policy

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert handle.policy is first and seen["policy"] is not first
    assert type(seen["policy"]) is type(first) and seen["policy"].model_view is first.model_view
    assert len(handle.stats().generations) == 2
    handle.remove()


# ------------------------------------------------------------------------------------------------ Heun
def _heun_sample(model, inputs, uncond, scheduler, steps: int, guidance: float = 3.0) -> torch.Tensor:
    """A Flux loop driven by diffusers' FlowMatchHeunDiscreteScheduler: timesteps t0, t1, t1, t2, t2, ...
    (two model evaluations per step after the first), CFG as two named forwards."""
    scheduler.set_timesteps(steps)
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    for t in scheduler.timesteps:
        sigma = torch.full((x.shape[0],), float(t) / 1000)
        with model.cache_context("cond"):
            v = model(hidden_states=x, timestep=sigma, return_dict=False, **cond)[0]
        with model.cache_context("uncond"):
            u = model(hidden_states=x, timestep=sigma, return_dict=False, **uncond)[0]
        x = scheduler.step(u + guidance * (v - u), t, x, return_dict=False)[0]
    return x


def test_heun_generation_is_one_generation_and_reuses_at_the_interval_rate():
    steps = 5  # 9 evaluations per branch
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    uncond = tiny_uncond_inputs("flux", inputs)
    config = ditcache.StaticIntervalConfig(interval=2, warmup_steps=1, reuse="output")
    handle = ditcache.apply(model, config)
    first = _heun_sample(model, inputs, uncond, FlowMatchHeunDiscreteScheduler(), steps)
    second = _heun_sample(model, inputs, uncond, FlowMatchHeunDiscreteScheduler(), steps)
    generations = handle.stats().generations
    assert len(generations) == 2 and torch.equal(first, second)  # the second call starts clean
    last = generations[-1]
    assert (last.forwards, last.steps) == (18, 9)
    # Every evaluation is a step: after step 0, every other one reuses (steps 2, 4, 6, 8), both branches.
    assert last.reused_steps == [2, 4, 6, 8] and last.reused_forwards == 8
    records = [r for r in handle.records() if r.generation == last.generation and r.branch == "cond"]
    assert [r.step for r in records] == list(range(9))
    handle.remove()


def test_heun_second_evaluation_is_reported_and_a_retried_step_keeps_its_place():
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    handle = ditcache.apply(model, "none")
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    x = inputs["hidden_states"]
    evaluations = []
    policy = handle.policy
    original = policy.forward
    policy.forward = lambda call: evaluations.append((call.info.step, call.info.evaluation)) or original(call)
    for sigma in (1.0, 0.5, 0.5, 0.25, 0.25):
        with model.cache_context("cond"):
            model(hidden_states=x, timestep=torch.tensor([sigma]), **cond)
    assert evaluations == [(0, 0), (1, 0), (2, 1), (3, 0), (4, 1)]
    assert len(handle.stats().generations) == 1

    # A forward that raises is forgotten: its retry gets the same step, in the same generation.
    policy.forward = lambda call: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"), model.cache_context("cond"):
        model(hidden_states=x, timestep=torch.tensor([0.1]), **cond)
    policy.forward = lambda call: evaluations.append((call.info.step, call.info.evaluation)) or original(call)
    with model.cache_context("cond"):
        model(hidden_states=x, timestep=torch.tensor([0.1]), **cond)
    assert evaluations[-1] == (5, 0) and len(handle.stats().generations) == 1
    handle.remove()


def test_unnamed_cfg_forwards_with_heun_keep_two_branches():
    """Chroma / Lumina2 call pattern (cond then uncond, unnamed) under Heun: the first timestep has two forwards,
    so the four forwards at a repeated timestep are default, default-2, default, default-2."""
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    handle = ditcache.apply(model, "none")
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    for sigma in (1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2):
        model(hidden_states=inputs["hidden_states"], timestep=torch.tensor([sigma]), **cond)
    records = handle.records()
    assert [(r.step, r.branch) for r in records] == [
        (0, "default"), (0, "default-2"),
        (1, "default"), (1, "default-2"), (2, "default"), (2, "default-2"),
        (3, "default"), (3, "default-2"), (4, "default"), (4, "default-2"),
    ]  # fmt: skip
    assert len(handle.stats().generations) == 1
    handle.remove()


def _pixart_heun():
    """PixArt-Sigma (batched CFG, no cache_context) with diffusers' HeunDiscreteScheduler: 6 steps, 11 forwards."""
    pipe = _pipeline(PixArtSigmaPipeline, "pixart", _tiny_vae(), HeunDiscreteScheduler())
    call = dict(negative_prompt=None, guidance_scale=4.0, height=8, width=8, use_resolution_binning=False)
    return pipe, _runner(pipe, PIXART_MASKS, torch.ones(1, 5), **call)


def _wan_heun():
    """Wan (two named forwards with step_index hints) with FlowMatchHeunDiscreteScheduler: 4 steps, 7 each."""
    vae = tiny_wan_vae()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchHeunDiscreteScheduler(),
        transformer=tiny_model("wan"),
    )
    call = dict(negative_prompt_embeds=_text(2), height=32, width=32, num_frames=5, num_inference_steps=4)

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return pipe(
            prompt_embeds=_text(1), **call, guidance_scale=3.0, generator=generator, output_type="latent"
        ).frames

    return pipe, run


def _flux_multistep(scheduler):
    def build():
        from .test_pipeline_e2e import _run, tiny_flux_pipeline

        pipe = tiny_flux_pipeline()
        pipe.scheduler = scheduler
        return pipe, lambda: _run(pipe)

    return build


FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


@pytest.mark.parametrize(
    "build, forwards, steps, reused",
    [
        (_pixart_heun, 11, 11, [2, 4, 6, 8]),
        (_wan_heun, 14, 7, [2, 4]),
        (_flux_multistep(DPMSolverMultistepScheduler(**FLOW, use_dynamic_shifting=True)), 12, 6, [2, 4]),
        (_flux_multistep(UniPCMultistepScheduler(**FLOW)), 12, 6, [2, 4]),
    ],
    ids=["pixart-heun", "wan-flowmatch-heun", "flux-dpmsolver++", "flux-unipc"],
)
def test_real_pipelines_with_heun_and_multistep_schedulers(build, forwards, steps, reused):
    pytest.importorskip("transformers")
    pipe, run = build()
    pipe.set_progress_bar_config(disable=True)
    handle = ditcache.apply(pipe, ditcache.StaticIntervalConfig(interval=2, warmup_steps=1, cooldown_steps=1))
    first, second = run(), run()
    generations = handle.stats().generations
    assert len(generations) == 2 and torch.equal(first, second)  # the second call is a new, clean generation
    for generation in generations:
        # Every evaluation is a step (num_steps = len(scheduler.timesteps), so the last one is a cool-down step).
        assert (generation.forwards, generation.steps, generation.reused_steps) == (forwards, steps, reused)
    handle.remove()


# ------------------------------------------------------------------------------------------------ records
def test_long_lived_handle_keeps_a_bounded_number_of_records():
    model, inputs = tiny_model("flux"), tiny_inputs("flux")
    handle = ditcache.apply(model, "static-2")
    assert handle.recorded_generations == 16
    handle.recorded_generations = 5
    generations, steps = 250, 4  # 1,000 forwards
    for _ in range(generations):
        euler_sample(model, "flux", inputs, steps)
    records = handle.records()
    assert len(records) == 5 * steps  # only the last 5 generations' records are held
    stats = handle.stats()
    assert len(stats.generations) == 5
    assert (stats.dropped_generations, stats.dropped_forwards) == (generations - 5, (generations - 5) * steps)
    assert all(g.forwards == steps and g.reused_steps == [3] for g in stats.generations)
    assert stats.to_dict()["dropped_generations"] == generations - 5
    with pytest.raises(ValueError, match="recorded_generations"):
        handle.recorded_generations = 0
    handle.reset()
    assert handle.records() == [] and handle.stats().dropped_generations == 0
    handle.remove()


def test_pipeline_handle_sets_the_record_limit_of_every_transformer():
    first, second = ditcache.apply(tiny_model("flux"), "none"), ditcache.apply(tiny_model("flux", seed=1), "none")
    handle = PipelineCacheHandle({"transformer": first, "transformer_2": second}, first.config)
    handle.recorded_generations = 2
    assert (first.recorded_generations, second.recorded_generations, handle.recorded_generations) == (2, 2, 2)
    handle.remove()


# ------------------------------------------------------------------------------------------------ layout
def _flux_inputs(height: int, width: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, height * width, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "pooled_projections": torch.randn(1, 16, generator=g),
        "img_ids": flux_image_ids(height, width),
        "txt_ids": torch.zeros(5, 3),
    }


def test_flux_aspect_ratio_change_with_the_same_token_count_is_a_new_layout():
    model = tiny_model("flux")
    square, wide = _flux_inputs(8, 8), _flux_inputs(4, 16)
    assert square["hidden_states"].shape == wide["hidden_states"].shape

    handle = ditcache.apply(model, "none")
    euler_sample(model, "flux", square, 2)
    # In the middle of a generation: a clear error.
    with pytest.raises(ValueError, match="position ids"), model.cache_context("cond"):
        model(hidden_states=wide["hidden_states"], timestep=torch.tensor([0.25]), **_conditioning(wide))
    handle.remove()

    # Unnamed forwards at one timestep: the other layout is a new generation, not a second CFG branch.
    handle = ditcache.apply(model, "fora-2")
    for inputs in (square, wide):
        model(hidden_states=inputs["hidden_states"], timestep=torch.tensor([1.0]), **_conditioning(inputs))
    assert [(r.generation, r.branch) for r in handle.records()] == [(1, "default"), (2, "default")]
    handle.remove()


def test_layout_under_inference_mode():
    """Inference tensors keep no version counter; position ids made under `torch.inference_mode` still work."""
    model = tiny_model("flux")
    handle = ditcache.apply(model, "fora-2")
    with torch.inference_mode():
        inputs = _flux_inputs(4, 16)
        cached = euler_sample(model, "flux", inputs, 4)
    assert len(handle.stats().generations) == 1
    handle.remove()
    with torch.inference_mode():
        fresh = ditcache.apply(model, "fora-2")
        assert torch.equal(euler_sample(model, "flux", inputs, 4), cached)
        fresh.remove()


def _conditioning(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "hidden_states"}
