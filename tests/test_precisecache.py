"""PreciseCache: LFCache decisions, trial forwards, BlockCache selection, validation; TeaCache baseline."""

import pytest
import torch

import ditcache
from ditcache.numerics import low_frequency
from ditcache.policies.precisecache import MAX_TRIAL_SKIP, LFCacheController, TrialBackoff, auto_downsample
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs


def test_lfcache_controller_matches_hand_computed_schedule():
    controller = LFCacheController(alpha=0.5, warmup_steps=3)
    lfds = {1: 1.0, 2: 2.0, 3: 0.3, 4: 0.5, 5: 0.4, 6: 0.9, 7: 0.2, 8: 1.5}
    decisions = {step: controller.decide(step, lfd) for step, lfd in lfds.items()}
    # delta = 0.5 * max(1.0, 2.0) = 1.0; E: 0.3 reuse, 0.8 reuse, 1.2 compute (reset), 0.9 reuse, 1.1 compute,
    # 1.5 compute.
    assert controller.delta == 1.0
    assert decisions == {1: False, 2: False, 3: True, 4: True, 5: False, 6: True, 7: False, 8: False}


def _run(name, config, steps=10, batch=2):
    model = tiny_model(name)
    inputs = tiny_inputs(name, batch=batch, frames=4)
    uncond = tiny_uncond_inputs(name, inputs)
    reference = euler_sample(model, name, inputs, steps, uncond)
    handle = ditcache.apply(model, config)
    out = euler_sample(model, name, inputs, steps, uncond, handle=handle)
    policy = handle.policy
    stats = handle.stats().last
    handle.remove()
    return out, reference, stats, policy


@pytest.mark.parametrize("name", ["flux", "sd3", "wan"])
def test_schedule_is_deterministic_and_replays_from_the_lfd_trace(name):
    config = ditcache.PreciseCacheConfig(alpha=3.0)  # random tiny weights: a loose delta makes reuse happen
    out1, _, stats1, policy = _run(name, config)
    out2, _, stats2, _ = _run(name, config)
    assert torch.equal(out1, out2) and stats1.reused == stats2.reused
    assert stats1.reused_forwards > 0
    replay = LFCacheController(3.0, 3)
    expected = [step for step, lfd in policy.lfd_trace if replay.decide(step, lfd)]
    assert stats1.reused_steps == expected
    # Both branches follow the single per-step decision; one trial per step after step 0 (first branch only).
    assert stats1.reused_forwards == 2 * len(expected)
    assert stats1.trial_forwards == 9


@pytest.mark.parametrize("name", ["flux", "sd3", "wan"])
def test_never_reusing_is_bit_identical_and_trials_cost_macs(name):
    out, reference, stats, _ = _run(name, ditcache.PreciseCacheConfig(alpha=1e-9))
    assert torch.equal(out, reference)
    assert stats.reused_forwards == 0 and stats.trial_forwards == 9
    assert stats.macs_executed > stats.macs_full  # the trials are paid for


def test_trial_backoff_skips_1_2_4_up_to_the_cap_and_restarts_after_a_reuse():
    backoff = TrialBackoff(patience=2)
    trialled = []
    outcomes = iter([False] * 7 + [True] + [False] * 40)
    for step in range(3, 60):
        if backoff.trial_due():
            trialled.append(step)
            backoff.record(next(outcomes))
    # 2 failures -> skip 1, then 2, 4, 8, 8, 8; the reuse at step 41 starts the count over.
    assert trialled[:8] == [3, 4, 6, 9, 14, 23, 32, 41]
    backoff = TrialBackoff(patience=2)
    for _ in range(20):
        backoff.record(False)
    assert backoff.skip_left == MAX_TRIAL_SKIP
    backoff.record(True)
    assert (backoff.failures, TrialBackoff(None).trial_due()) == (0, True)


def test_trial_patience_stops_paying_for_trials_that_never_reuse():
    # alpha 1e-9 never reuses: the paper's rule trials at all 19 steps after step 0; patience 2 at the warm-up
    # steps 1, 2 and at steps 3, 4, 6, 9, 14 (skipping 1, 2, 4, then 8 steps: 15-22, past the end).
    config = ditcache.PreciseCacheConfig(alpha=1e-9, trial_patience=2)
    out, reference, stats, policy = _run("flux", config, steps=20)
    assert torch.equal(out, reference)  # skipped trials are computed steps: still exact
    assert [step for step, _ in policy.lfd_trace] == [1, 2, 3, 4, 6, 9, 14]
    assert stats.trial_forwards == 7 and stats.reused_forwards == 0
    _, _, paper, _ = _run("flux", ditcache.PreciseCacheConfig(alpha=1e-9), steps=20)
    assert paper.trial_forwards == 19 and paper.macs_executed > stats.macs_executed
    with pytest.raises(ValueError, match="trial_patience"):
        ditcache.PreciseCacheConfig(trial_patience=0)


def test_block_cache_skips_the_least_changing_blocks():
    config = ditcache.PreciseCacheConfig(alpha=1e-9, block_cache_ratio=0.5, block_cache_steps=2)
    _, _, stats, _ = _run("flux", config, steps=7)
    # Per branch: computed steps cycle full, partial, partial (L = 2): 4 blocks, then 2 of 4 twice.
    per_branch = stats.blocks_computed[0::2]
    assert per_branch == [4.0, 2.0, 2.0, 4.0, 2.0, 2.0, 4.0]
    assert stats.blocks_total == 4


def test_block_cache_selection_is_by_change():
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", frames=4)
    handle = ditcache.apply(model, ditcache.PreciseCacheConfig(alpha=1e-9, block_cache_ratio=0.34))
    euler_sample(model, "wan", inputs, 2)
    state = handle.branch_state("cond")
    smallest = min(state.change, key=state.change.get)
    assert state.skip == {smallest}  # round(0.34 * 3) = 1 block
    handle.remove()


def test_low_frequency_mask():
    x = torch.randn(1, 2, 1, 8, 8)
    full = low_frequency(x, 1.0)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, dim=(-2, -1)), dim=(-2, -1))
    assert torch.allclose(full, spectrum)
    dc_only = low_frequency(x, 0.1)
    assert torch.count_nonzero(dc_only[0, 0, 0]) == 1
    assert torch.allclose(dc_only[0, 0, 0, 4, 4], x[0, 0, 0].sum().to(torch.complex64), atol=1e-4)


def test_auto_downsample_keeps_patch_divisibility():
    assert auto_downsample((8, 60, 104), (1, 2, 2), video=True) == (2, 2, 4)  # 60/4 = 15 is odd: 2
    assert auto_downsample((1, 8, 8), (1, 1, 1), video=False) == (1, 4, 4)
    assert auto_downsample((4, 8, 8), (1, 2, 2), video=True) == (2, 4, 4)


def test_non_dividing_downsample_is_a_clear_error():
    model = tiny_model("sd3")
    handle = ditcache.apply(model, ditcache.PreciseCacheConfig(downsample=(1, 3, 3)))
    with pytest.raises(ValueError, match="downsample factor 3"):
        euler_sample(model, "sd3", tiny_inputs("sd3"), 3)
    handle.remove()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"warmup_steps": 1}, "warmup_steps"),
        ({"downsample": (2, 2)}, "downsample"),
        ({"downsample": (1, 0, 2)}, "downsample"),
        ({"radius": 0.0}, "radius"),
        ({"radius": 1.5}, "radius"),
        ({"block_cache_ratio": 1.0}, "block_cache_ratio"),
        ({"block_cache_steps": 0}, "block_cache_steps"),
    ],
)
def test_invalid_precisecache_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ditcache.PreciseCacheConfig(**kwargs)


def test_presets_match_the_paper():
    assert ditcache.preset("precisecache-base").alpha == 0.5
    assert ditcache.preset("precisecache-turbo").alpha == 0.7
    flash = ditcache.preset("precisecache-flash")
    assert (flash.alpha, flash.block_cache_ratio, flash.block_cache_steps) == (0.7, 0.4, 3)


@pytest.mark.parametrize("name", ["flux", "sd3", "wan"])
def test_teacache_zero_threshold_is_exact_and_high_threshold_skips(name):
    out, reference, stats, _ = _run(name, ditcache.TeaCacheConfig(threshold=0.0))
    assert torch.equal(out, reference) and 0.0 not in stats.blocks_computed
    _, _, stats, _ = _run(name, ditcache.TeaCacheConfig(threshold=10.0, warmup_steps=2))
    # Steps 0 and 1 compute (warm-up); with a huge threshold every later step skips all blocks.
    assert stats.blocks_computed[4:] == [0.0] * 16


def test_step_impact_study_on_a_tiny_pipeline():
    from ditcache.analysis.precisecache import step_impact_study
    from ditcache.refmodels import RefModel, RefPipeline

    from .test_refmodels import TINY_IMAGE

    pipe = RefPipeline(RefModel(TINY_IMAGE))
    study = step_impact_study(pipe, "tiny", steps=5, samples=2, progress=False)
    assert len(study.impact) == len(study.lfd) == len(study.output_rel_l1) == len(study.input_rel_l1) == 4
    assert all(value > 0 for value in study.impact)  # reusing any single step changes the output
    assert set(study.correlations) == {"LFD (PreciseCache)", "rel-L1 of output", "rel-L1 of modulated input (TeaCache)"}
    assert "Spearman" in study.markdown()
