"""MixCache: Algorithm 1's decisions on synthetic D values, profiles, CFG skipping, batch/no-CFG."""

import warnings

import pytest
import torch

import ditcache
from ditcache.calibration.mixcache import calibrate, candidate_positions, stabilised_from
from ditcache.calibration.profiles import Profile, ProfileMismatchError
from ditcache.policies.mixcache_controller import (
    CFG,
    FULL,
    STEP,
    Granularity,
    MixCacheController,
    MixCacheProfileData,
    Phase,
    block_choice,
)
from ditcache.refmodels import RefModel, RefPipeline
from ditcache.testing import tiny_ref_image_spec

TINY = tiny_ref_image_spec(num_layers=2, num_single_layers=2)


def _controller(**kwargs):
    profile = MixCacheProfileData(
        theta=0.1, delta1=0.05, delta2=0.2, impact_step=1.0, impact_cfg=10.0, impact_block={2: [1.0] * 20}
    )
    base = dict(profile=profile, intervals=(4, 3, 2), granularities=frozenset(Granularity))
    return MixCacheController(**{**base, **kwargs})


def test_warmup_until_d_step_below_theta_then_interval_and_argmin():
    c = _controller()
    decisions = []
    d_step_seen = [1.0, 0.5, 0.3, 0.2, 0.08]  # latest D_step known when step s is decided
    for step in range(10):
        c.d[STEP] = d_step_seen[min(step, 4)]
        c.d.setdefault(CFG, 0.05)  # P_cfg = 0.5
        c.d[block_choice(2)] = 0.3  # P_block = 0.3; P_step = d_step * 1.0 = 0.08 -> step first
        decisions.append(c.decide(step))
        if decisions[-1] == FULL:
            c.full_step_done(0.1)  # between delta1 and delta2: N = 3
    # Steps 0-3 warm-up (D_step >= theta until 0.08 is seen at step 4). Then N = 3: cached, cached, full.
    # Penalty alternates: step (lowest P), then block (next lowest), ...
    assert decisions[:4] == [FULL] * 4
    assert [str(d) for d in decisions[4:]] == ["step", "block:2", "full", "step", "block:2", "full"]


def test_interval_scaling_and_fixed_interval():
    c = _controller()
    c.phase = Phase.CACHE
    c.full_step_done(0.01)
    assert c.interval == 4
    c.full_step_done(0.1)
    assert c.interval == 3
    c.full_step_done(0.5)
    assert c.interval == 2
    fixed = _controller(adaptive_interval=False, fixed_interval=4)
    fixed.phase = Phase.CACHE
    fixed.full_step_done(0.5)
    assert fixed.interval == 4


def test_penalty_forbids_the_same_granularity_twice():
    c = _controller(penalty=True)
    c.d.update({STEP: 0.01, CFG: 1.0})
    c.last_choice = STEP
    assert c.choose(5) == CFG
    c = _controller(penalty=False)
    c.d.update({STEP: 0.01, CFG: 1.0})
    c.last_choice = STEP
    assert c.choose(5) == STEP


def test_helpers():
    assert candidate_positions(40) == (9, 19, 29)  # blocks 10/20/30 of 40 in the paper, 0-based
    assert candidate_positions(6) == (1, 2, 3)  # round half to even: 1.5 -> 2, 4.5 -> 4
    # t = 7: |0.2 - mean(0.3, 0.2, 0.2, 0.2, 0.2)| = 0.02 <= 10% of 0.22
    assert stabilised_from([1.0, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2]) == 7
    assert stabilised_from([1.0, 0.5, 0.3]) == 1  # never stable: the first fifth


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    pipe = RefPipeline(RefModel(TINY))
    profile = calibrate(pipe.transformer, pipe.calibration_run(12, 2), "tiny")
    path = profile.save(tmp_path_factory.mktemp("p") / "mixcache-tiny-12.json")
    return pipe, path


def test_profile_round_trip_and_mismatch(tiny_profile):
    pipe, path = tiny_profile
    profile = Profile.load(path)
    assert profile.method == "mixcache" and profile.num_steps == 12
    assert set(profile.data["impact_block"]) == {str(p) for p in candidate_positions(4)}
    assert 0 < profile.data["delta1"] <= profile.data["theta"] <= profile.data["delta2"]
    handle = ditcache.apply(pipe, ditcache.MixCacheConfig(profile=str(path)))
    with pytest.raises(ProfileMismatchError, match="calibrated for 12 steps"):
        pipe([0], num_inference_steps=10)
    handle.remove()
    torch.manual_seed(123)  # other weights, same architecture
    other = RefPipeline(RefModel(TINY))
    handle = ditcache.apply(other, ditcache.MixCacheConfig(profile=str(path)))
    with pytest.raises(ProfileMismatchError, match="another model"):
        other([0], num_inference_steps=12)
    handle.remove()


def test_cfg_granularity_skips_the_unconditional_forward(tiny_profile):
    pipe, path = tiny_profile
    handle = ditcache.apply(pipe, ditcache.MixCacheConfig(profile=str(path), granularities=("cfg",)))
    pipe([0, 1], num_inference_steps=12)
    trace = dict(handle.policy.trace)
    stats = handle.stats().last
    handle.remove()
    cfg_steps = sorted(s for s, choice in trace.items() if choice == CFG)
    assert cfg_steps, trace
    # Every cfg step reuses exactly its unconditional forward; the conditional one is computed.
    assert sorted(s for s, b in stats.reused) == cfg_steps and {b for _, b in stats.reused} == {"uncond"}
    assert stats.computed_forwards == 24 - len(cfg_steps)


def test_block_granularity_skips_the_blocks_up_to_the_candidate(tiny_profile):
    pipe, path = tiny_profile
    handle = ditcache.apply(pipe, ditcache.MixCacheConfig(profile=str(path), granularities=("block",)))
    pipe([0, 1], num_inference_steps=12)
    trace = handle.policy.trace
    stats = handle.stats().last
    handle.remove()
    forwards = {}
    for record in handle.records():
        forwards.setdefault((record.step, record.branch), record)
    for step, choice in trace:
        if choice.granularity is Granularity.BLOCK:
            position = choice.block
            cond = forwards[(step, "cond")]
            assert cond.block_fraction == [0.0] * (position + 1) + [1.0] * (4 - position - 1)
            assert forwards[(step, "uncond")].kind == "reused"
    assert stats.macs_speedup > 1.0


def test_without_cfg_branch_the_cfg_granularity_is_disabled_with_one_warning(tiny_profile):
    pipe, path = tiny_profile
    handle = ditcache.apply(pipe, ditcache.MixCacheConfig(profile=str(path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe([0, 1], num_inference_steps=12, cfg_mode="batched")
        pipe([0, 1], num_inference_steps=12, cfg_mode="batched")
    assert sum("CFG granularity is disabled" in str(w.message) for w in caught) == 1
    assert all(choice != CFG for _, choice in handle.policy.trace)
    assert torch.isfinite(out).all()
    handle.remove()


def test_batched_cfg_computes_only_the_conditional_half(tiny_profile):
    """A pipeline that batches [uncond; cond] in one forward gets the same decisions as separate forwards:
    cfg and block steps run the conditional rows only, the unconditional half is cond + cached difference."""
    pipe, path = tiny_profile
    runs = {}
    for cfg_mode, order in (("separate", "none"), ("batched", "uncond-first")):
        handle = ditcache.apply(pipe, ditcache.MixCacheConfig(profile=str(path), batched_cfg=order))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "CFG granularity is disabled" warning in either mode
            out = pipe([0, 1], num_inference_steps=12, cfg_mode=cfg_mode)
        runs[cfg_mode] = (out, handle.policy.trace, handle.stats().last, handle.records())
        handle.remove()
    (out_s, trace_s, stats_s, _), (out_b, trace_b, stats_b, records_b) = runs["separate"], runs["batched"]
    assert trace_b == trace_s
    choices = dict(trace_b)
    halves = {step for step, c in choices.items() if c == CFG or c.granularity is Granularity.BLOCK}
    assert any(c == CFG for c in choices.values())
    assert any(c.granularity is Granularity.BLOCK for c in choices.values())
    for record in records_b:
        if record.step in halves:
            assert dict(record.executed_key)["hidden_states"][0] == 2  # 2 of the 4 rows computed
        else:
            assert record.executed_key is None
    assert stats_b.partial_batch_forwards == len(halves)
    assert stats_s.partial_batch_forwards == 0
    torch.testing.assert_close(out_b, out_s, atol=1e-4, rtol=1e-4)
    assert stats_b.macs_speedup == pytest.approx(stats_s.macs_speedup, rel=1e-2)


def test_batched_cfg_rejects_an_odd_batch(tiny_profile):
    pipe, path = tiny_profile
    handle = ditcache.apply(pipe, ditcache.MixCacheConfig(profile=str(path), batched_cfg="uncond-first"))
    x, timestep = torch.randn(3, *TINY.sample_shape), torch.full((3,), 1000.0)
    with handle.generation(num_steps=12), pytest.raises(ValueError, match="batched_cfg"):
        pipe.model.predict(x, timestep, torch.tensor([0, 1, 2]))
    out = pipe([0, 1], num_inference_steps=12, cfg_mode="batched")  # the handle still works afterwards
    assert torch.isfinite(out).all() and handle.stats().last.forwards == 12
    handle.remove()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "fast"}, "mode"),
        ({"granularities": ("layer",)}, "granularities"),
        ({"granularities": ()}, "granularities"),
        ({"fixed_interval": 1}, "fixed_interval"),
        ({"penalty": "yes"}, "penalty"),
        ({"batched_cfg": "uncond_first"}, "batched_cfg"),
    ],
)
def test_invalid_mixcache_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ditcache.MixCacheConfig(**kwargs)
