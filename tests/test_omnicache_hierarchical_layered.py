"""OmniCache layered cache: greedy schedule (Alg. 1), refinement (Alg. 2/3), calibration; token kernels' dispatch."""

from __future__ import annotations

import random

import pytest
import torch

import ditcache
from ditcache.calibration.omnicache_layered import (
    chain_parents,
    greedy_schedule,
    refine,
    saving,
    schedule_from_profile,
)
from ditcache.kernels import backend, gather_rows_tokens, merge_mean, scatter_rows_tokens, select_backend
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_greedy_schedule_on_a_synthetic_table_equals_the_hand_computed_one():
    # 3 blocks in a chain, 6 steps, block 1 costs twice as much; every step costs 1 + 2 + 1 = 4, so 24 in all.
    loss = [
        [0.0, 0.1, 0.1, 0.1, 0.1, 0.1],  # w = 0.1
        [0.0, 0.1, 0.1, 0.1, 0.1, 0.1],  # w = 0.05: the cheapest to reuse for its cost
        [0.0, 0.3, 0.3, 0.02, 0.3, 0.3],  # w = 0.3, but 0.02 at step 3: first of all
    ]
    latency = [1.0, 2.0, 1.0]
    # 1.5x = save 1/3 = 8 of 24. By hand, ascending w: (2,3) saves 1; (1,1), (1,2) -> 5; (1,3) would be a third
    # reuse in a row with interval 3 and block 0 (the parent) is cached nowhere later -> dropped, still 5;
    # (1,4) -> 7; (1,5) -> 9 >= 8: stop.
    schedule = greedy_schedule(loss, latency, total=24.0, speedup=1.5, interval=3)
    assert schedule == {(2, 3), (1, 1), (1, 2), (1, 4), (1, 5)}
    assert saving(schedule, latency, 24.0) == 9 / 24
    # 2x = save 12: the rest of block 1 is out of interval, block 0 (w 0.1) follows: (0,1), (0,2) -> 11,
    # (0,3) out of interval, no parent -> dropped; (0,4) -> 12.
    assert greedy_schedule(loss, latency, total=24.0, speedup=2.0, interval=3) == {
        (2, 3),
        (1, 1),
        (1, 2),
        (1, 4),
        (1, 5),
        (0, 1),
        (0, 2),
        (0, 4),
    }


def test_refinement_moves_out_of_interval_cells_to_the_parents_next_cached_step():
    parents = chain_parents(2)
    # block 1 wants steps 1, 2, 3: with interval 3 the third in a row is out of interval; block 0 is cached at
    # 4 and 5, so the cell moves to step 4 (the earliest later parent step where it fits).
    assert refine([(0, 1), (0, 2), (0, 4), (0, 5), (1, 1), (1, 2), (1, 3)], parents, 6, interval=3) == {
        (0, 1),
        (0, 2),
        (0, 4),
        (0, 5),
        (1, 1),
        (1, 2),
        (1, 4),
    }
    # step 0 has nothing cached; a block of zero cost saves nothing; a root cell out of interval is dropped
    assert refine([(0, 0), (0, 1), (1, 1)], parents, 6, interval=3, latency=[1.0, 0.0]) == {(0, 1)}
    assert refine([(0, 1), (0, 2), (0, 3)], parents, 6, interval=3) == {(0, 1), (0, 2)}


@pytest.mark.parametrize("seed", range(5))
def test_refined_schedules_honour_the_interval_and_the_dependencies(seed):
    rng = random.Random(seed)
    blocks, steps, interval = 5, 12, 4
    parents = chain_parents(blocks)

    def check(cells: set) -> dict[int, set[int]]:
        by_block = {b: {s for c, s in cells if c == b} for b in range(blocks)}
        for cached in by_block.values():
            assert 0 not in cached
            for s in cached:  # never `interval` reuses in a row: one computed step in every `interval`
                assert not all(s - i in cached for i in range(interval))
        return by_block

    wanted = {(b, s) for b in range(blocks) for s in range(steps) if rng.random() < 0.6}
    refined = refine(wanted, parents, steps, interval)
    by_block = check(refined)
    assert len(refined) <= len(wanted)
    for b, s in refined - wanted:  # a moved cell sits on a step its parent reuses
        assert b > 0 and s in by_block[b - 1]
    loss = [[rng.random() for _ in range(steps)] for _ in range(blocks)]
    latency = [rng.choice([1.0, 2.0, 3.0]) for _ in range(blocks)]
    total = steps * (sum(latency) + 1.0)
    for speedup in (1.3, 2.0):
        schedule = greedy_schedule(loss, latency, total, speedup, interval=interval)
        check(schedule)
        assert saving(schedule, latency, total) >= 1 - 1 / speedup


def _run(model, family, steps, handle=None):
    inputs = tiny_inputs(family)
    return euler_sample(model, family, inputs, steps, tiny_uncond_inputs(family, inputs), handle=handle)


def test_calibrate_then_apply_the_layered_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model, steps = tiny_model("flux"), 8
    profile = ditcache.calibrate(
        model, "omnicache-layered", num_steps=steps, run=lambda h: _run(model, "flux", steps, h)
    )
    data = profile.data
    assert len(data["loss"]) == 4 and len(data["loss"][0]) == steps and data["latency"] == "macs"
    assert all(value == 0.0 for row in data["loss"] for value in row[:1])  # step 0: nothing to reuse
    assert all(value > 0.0 for row in data["loss"] for value in row[1:])
    assert set(data["schedules"]) == {"2", "3"} and data["schedules"]["2"]["macs_speedup"] >= 2.0
    handle = ditcache.apply(model, "omnicache-layered-2x")
    with handle.generation(num_steps=steps):
        _run(model, "flux", steps, handle)
    stats = handle.stats().last
    expected = schedule_from_profile(data, 2.0, 4)
    skipped = {(p, s) for s in range(steps) for p in range(4)} - {
        (p, r.step) for r in handle.records() if r.branch == "cond" for p, f in enumerate(r.block_fraction) if f
    }
    assert skipped == expected
    assert stats.macs_speedup >= 1.9  # the profile's blocks + outside cost, both branches alike
    handle.remove()


def test_layered_needs_a_profile_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model = tiny_model("sd3")
    handle = ditcache.apply(model, "omnicache-layered-2x")
    with pytest.raises(ValueError, match="ditcache calibrate omnicache-layered"), handle.generation(num_steps=4):
        _run(model, "sd3", 4, handle)
    handle.remove()


# ------------------------------------------------------------------------------------------------ kernels
def test_kernel_backend_selection():
    assert select_backend("cuda", True, None) == "triton"
    assert select_backend("cuda", False, None) == "torch"
    assert select_backend("cpu", True, None) == "torch"
    assert select_backend("cuda", True, "torch") == "torch"
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        select_backend("cpu", True, "triton")
    with pytest.raises(ValueError, match="DITCACHE_KERNELS must be one of"):
        select_backend("cuda", True, "cuda")
    assert backend(torch.zeros(1)) == "torch"


def test_torch_kernels_match_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g)
    index = torch.tensor([[0, 4], [5, 1]])
    fresh = torch.randn(2, 2, 3, generator=g)
    assert torch.equal(gather_rows_tokens(x, index), torch.stack([x[0, [0, 4]], x[1, [5, 1]]]))
    out = scatter_rows_tokens(x, index, fresh)
    expected = x.clone()
    expected[0, [0, 4]], expected[1, [5, 1]] = fresh[0], fresh[1]
    assert torch.equal(out, expected) and not torch.equal(out, x)
    src, dst = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 0], [5, 5]])
    merged = merge_mean(x, src, dst)
    torch.testing.assert_close(merged[0, 0], (x[0, 0] + x[0, 1] + x[0, 2]) / 3)
    torch.testing.assert_close(merged[1, 5], (x[1, 5] + x[1, 3] + x[1, 4]) / 3)
    assert torch.equal(merged[0, 1:], x[0, 1:]) and torch.equal(merged[1, :5], x[1, :5])
