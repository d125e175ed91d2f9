"""`ditcache.calibrate` on models the project never saw: hand-written loops and a real diffusers pipeline."""

from __future__ import annotations

import pytest
import torch

import ditcache
from ditcache.calibration.profiles import Profile, ProfileMismatchError, user_profile_dir
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

STEPS = 8
PRESETS = {"mixcache": "mixcache-acc", "omnicache-trajectory": "omnicache-traj-slow"}


def _loop(model, family, steps=STEPS):
    inputs = tiny_inputs(family, batch=2)
    uncond = tiny_uncond_inputs(family, inputs)
    return lambda handle: euler_sample(model, family, inputs, steps, uncond, guidance=3.0, handle=handle)


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_calibrate_a_hand_written_loop_then_apply_finds_the_profile(method, family, tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model = tiny_model(family, seed=3)  # not the weights any shipped or test profile was made for
    loop = _loop(model, family)
    # run(handle): the loop names its branches with the recording handle (SD3 has no cache_context).
    profile = ditcache.calibrate(model, method, num_steps=STEPS, run=loop, guidance=3.0)
    saved = list(tmp_path.glob(f"{method}-*-{STEPS}.json"))
    assert len(saved) == 1 and Profile.load(saved[0]).fingerprint == profile.fingerprint
    assert profile.method == method and profile.num_steps == STEPS and profile.data["samples"] == 2
    if method == "mixcache":
        assert profile.data["cfg_branches"] is True and profile.data["impact_block"]
    else:
        assert profile.data["schedules"]["slow"] and len(profile.data["gamma"]) == STEPS

    handle = ditcache.apply(model, PRESETS[method])  # no path: found in the user profile directory
    with handle.generation(num_steps=STEPS):
        out = loop(handle)
    stats = handle.stats().last
    handle.remove()
    assert torch.isfinite(out).all() and stats.steps == STEPS
    assert stats.macs_executed < stats.macs_full  # the calibrated method reuses something on this model
    # Another step count is refused, naming the call that makes a profile for it.
    handle = ditcache.apply(model, PRESETS[method])
    refused = pytest.raises(ProfileMismatchError, match=r"ditcache.calibrate\(pipe_or_model, '.*', num_steps=6")
    with refused, handle.generation(num_steps=6):
        _loop(model, family, steps=6)(handle)
    handle.remove()


def test_calibrate_refuses_bad_input_clearly():
    model = tiny_model("wan")
    with pytest.raises(ValueError, match="method must be one of"):
        ditcache.calibrate(model, "fora", num_steps=8, run=lambda: None)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
        ditcache.calibrate(model, "mixcache", num_steps=1, run=lambda: None)
    with pytest.raises(ValueError, match="needs run="):
        ditcache.calibrate(model, "mixcache", num_steps=8)
    with pytest.raises(ValueError, match="ran steps"):  # the loop runs 4 steps, not 8
        ditcache.calibrate(model, "omnicache-trajectory", num_steps=8, run=_loop(model, "wan", steps=4))
    assert not user_profile_dir().exists() or not list(user_profile_dir().glob("*-8.json"))


def test_calibrate_through_a_real_diffusers_pipeline(tmp_path, monkeypatch):
    from .test_pipeline_e2e import tiny_flux_pipeline

    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    pipe = tiny_flux_pipeline()
    call = dict(negative_prompt="blurry", true_cfg_scale=3.0, height=16, width=16, max_sequence_length=16)
    prompts = ["a photo of a cat", "a red dog"]
    for method in sorted(PRESETS):
        profile = ditcache.calibrate(pipe, method, num_steps=12, prompts=prompts, **call)
        assert profile.data["samples"] == 2 and profile.data["saved_to"].startswith(str(tmp_path))
    unsaved = ditcache.calibrate(pipe, "mixcache", num_steps=6, prompts=prompts, save=False, **call)
    assert unsaved.data["guidance"] == 3.0 and "saved_to" not in unsaved.data
    for preset in PRESETS.values():
        handle = ditcache.apply(pipe, preset)
        images = pipe(prompt=prompts, num_inference_steps=12, output_type="pt", **call).images
        stats = handle.stats().last
        handle.remove()
        assert torch.isfinite(images).all() and stats.forwards == 24 and stats.macs_speedup > 1.0


def test_threshold_rules_follow_the_accumulate_and_reset_rule():
    from ditcache.calibration.thresholds import calibrated_threshold, reused_steps, reused_steps_since_computed

    values = [None, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert reused_steps(values, 0.25, warmup=1) == [2, 3, 5, 6]  # 0.3 computes; 0.1+0.1 < .25; reset at 0.3
    assert reused_steps(values, 0.05, warmup=1) == []
    threshold = calibrated_threshold({"values": values}, 8, 0.5, warmup=1)
    assert len(reused_steps(values, threshold, 1)) == 4 and len(reused_steps(values, threshold * 0.99, 1)) < 4
    assert len(reused_steps(values, calibrated_threshold({"values": values}, 8, 0.9, 1), 1)) == 7  # all after warm-up
    # Against the last computed step the value grows with the lag: lag 1 costs 0.1, lag 2 0.3, lag 3 0.6.
    by_lag = {1: [None] + [0.1] * 7, 2: [None, None] + [0.3] * 6, 3: [None] * 3 + [0.6] * 5}
    assert reused_steps_since_computed(by_lag, 0.45, warmup=1) == [1, 2, 4, 5, 7]  # 0.1, 0.1+0.3; then 0.6 > .45
    threshold = calibrated_threshold({"by_lag": {str(k): v for k, v in by_lag.items()}}, 8, 0.25, warmup=1)
    assert len(reused_steps_since_computed(by_lag, threshold, 1)) >= 2


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize(("method", "preset"), [("teacache", "teacache-2x"), ("precisecache", "precisecache-2x")])
def test_calibrated_thresholds_reuse_the_target_share_on_any_model(method, preset, family, tmp_path, monkeypatch):
    """A threshold-based preset means about the same speed on every model: the calibrated threshold reuses
    about half of the steps on two unrelated tiny models."""
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    steps = 12
    model = tiny_model(family, seed=5)
    loop = _loop(model, family, steps=steps)
    with pytest.raises(ProfileMismatchError, match=f"'{method}'"):
        handle = ditcache.apply(model, preset)
        try:
            with handle.generation(num_steps=steps):
                loop(handle)
        finally:
            handle.remove()
    profile = ditcache.calibrate(model, method, num_steps=steps, run=loop, guidance=3.0)
    assert len(profile.data["values"]) == steps and profile.data["values"][1] is not None
    handle = ditcache.apply(model, preset)
    with handle.generation(num_steps=steps):
        out = loop(handle)
    stats = handle.stats().last
    handle.remove()
    assert torch.isfinite(out).all()
    skipped_steps = stats.blocks_computed.count(0.0) / 2  # forwards reused whole or with every block skipped
    assert 4 <= skipped_steps <= 7  # ~50% of 12, within the decision noise of the real run
