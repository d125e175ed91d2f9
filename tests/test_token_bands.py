"""Token bands (engine/token_bands.py): selection inside equal contiguous parts of the token sequence, the
one-process twin of context parallelism. (Context-parallel runs against `token_bands=2` in one process:
tests/test_parallel_context.py.)"""

from __future__ import annotations

import pytest
import torch

import ditcache
from ditcache.adapters import LatentGrid
from ditcache.engine.decisions import DecisionSync
from ditcache.engine.token_bands import TokenBands, band_grid, from_bands, merge_band_index, to_bands
from ditcache.policies.tokencache_schedule import choose_tokens, top_tokens
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_band_is_the_plain_top_k():
    scores = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(choose_tokens(scores, 5, per_row=True), top_tokens(scores, 5))
    assert torch.equal(choose_tokens(scores, 5, per_row=True, bands=1), top_tokens(scores, 5))
    assert torch.equal(choose_tokens(scores, 5, per_row=False), top_tokens(scores.mean(0, keepdim=True), 5)[0])


def test_bands_keep_the_best_of_each_band():
    # global top 2 of row 0 would be tokens 0 and 1 (both in the first half); bands take one from each half
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.3, 0.7, 0.6]])
    assert choose_tokens(scores, 2, per_row=True).tolist() == [[0, 1], [2, 3]]
    assert choose_tokens(scores, 1, per_row=True, bands=2).tolist() == [[0, 3], [1, 2]]
    # shared by the rows: the row-averaged scores [0.5, 0.55, 0.4, 0.4] -> token 1 of band 0, token 2 of band 1
    assert choose_tokens(scores, 1, per_row=False, bands=2).tolist() == [1, 2]


def test_band_reshapes_round_trip():
    x = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    banded = to_bands(x, 3)
    assert banded.shape == (6, 2, 3)
    assert torch.equal(banded[1], x[0, 2:4])  # row 0's second band
    assert torch.equal(from_bands(banded, 3), x)
    index = torch.tensor([[1], [0], [1], [0], [0], [1]])  # (rows x bands, 1) inside bands of 2 tokens
    assert merge_band_index(index, 3, 2).tolist() == [[1, 2, 5], [0, 2, 5]]


def test_resolve_in_one_process_and_sizes():
    sync = DecisionSync(None)
    assert TokenBands.resolve(1, sync) == TokenBands(1, 1, 0)
    assert TokenBands.resolve(4, sync) == TokenBands(4, 4, 0)
    assert TokenBands(4, 4, 0).size(64) == 16
    with pytest.raises(ValueError, match="token_bands: 4 bands must divide the 30 tokens"):
        TokenBands(4, 4, 0).size(30)


def test_band_grids_are_boxes():
    video, image = LatentGrid(8, 8, 8), LatentGrid(1, 8, 6)
    assert band_grid(video, 512, 2) == LatentGrid(4, 8, 8)  # whole frames
    assert band_grid(image, 48, 2) == LatentGrid(1, 4, 6)  # rows of the image
    assert band_grid(video, 64, 2) == LatentGrid(8, 4, 8)  # a per-frame stream (Latte's spatial blocks)
    assert band_grid(video, 512, 1) is video
    with pytest.raises(ValueError, match="token_bands: 2 bands of a 5 x 8 x 8"):
        band_grid(LatentGrid(5, 8, 8), 320, 2)
    with pytest.raises(ValueError, match="token_bands: 3 bands"):
        band_grid(image, 48, 3)


@pytest.mark.parametrize("config", [ditcache.TokenCacheConfig, ditcache.OmniCacheHierarchicalConfig])
def test_token_bands_is_validated(config):
    with pytest.raises(ValueError, match="token_bands"):
        config(token_bands=0)
    with pytest.raises(ValueError, match="token_bands"):
        config(token_bands=65)


def _tokencache(model, inputs, uncond, bands: int, ratio: float):
    spec = f"tokencache:selection=norm:schedule=uniform:refiners=0:lora=False:full_steps=2:ratio={ratio}"
    handle = ditcache.apply(model, f"{spec}:token_bands={bands}")
    try:
        with handle.generation(num_steps=6):
            out = euler_sample(model, "flux", inputs, 6, uncond, handle=handle)
        return out, handle.policy.trace, handle.stats().last.block_tokens
    finally:
        handle.remove()


def test_tokencache_bands_split_each_count_over_the_bands():
    model = tiny_model("flux")
    inputs = tiny_inputs("flux", batch=2, size=8)  # 8 x 8 = 64 image tokens
    uncond = tiny_uncond_inputs("flux", inputs)
    whole, whole_trace, _ = _tokencache(model, inputs, uncond, 1, 0.7)
    halves, halves_trace, _ = _tokencache(model, inputs, uncond, 2, 0.7)
    # round(0.3 x 64) = 19 tokens per block in one band; round(19 / 2) = 10 per band -> 20 in two bands
    assert {tuple(counts) for *_, counts in whole_trace} == {(19,) * 4}
    assert {tuple(counts) for *_, counts in halves_trace} == {(20,) * 4}
    assert not torch.equal(whole, halves) and torch.isfinite(halves).all()
    with pytest.raises(ValueError, match="token_bands: 3 bands must divide the 64 tokens"):
        _tokencache(model, inputs, uncond, 3, 0.7)
    again, _, _ = _tokencache(model, inputs, uncond, 1, 0.7)  # the failed run left nothing behind
    assert torch.equal(again, whole)


def test_omnicache_bands_match_inside_each_band():
    model = tiny_model("flux")
    inputs = tiny_inputs("flux", batch=2, size=16)  # two bands: the top and the bottom half of the rows
    outputs, tokens = {}, {}
    for bands in (1, 2):
        handle = ditcache.apply(model, f"omnicache-hier:token_ratio=0.5:token_bands={bands}")
        outputs[bands] = euler_sample(model, "flux", inputs, 4, handle=handle)
        tokens[bands] = handle.stats().last.block_tokens
        handle.remove()
    assert tokens[1] == tokens[2]  # the same share skipped: half of each band's sources
    assert not torch.equal(outputs[1], outputs[2])  # but chosen inside each band
    assert (outputs[1] - outputs[2]).abs().max() < 1.0


# ---------------------------------------------------------------- TokenCache: forecast token updates (issue 16)


def _forecast_run(forecast: str, ratio: float):
    model = tiny_model("flux")
    inputs = tiny_inputs("flux", batch=2, size=8)
    spec = f"tokencache:selection=random:schedule=uniform:refiners=0:lora=False:full_steps=2:ratio={ratio}"
    handle = ditcache.apply(model, f"{spec}:forecast={forecast}")
    with handle.generation(num_steps=5):  # I-steps 0 and 2; P-steps 1, 3, 4
        out = euler_sample(model, "flux", inputs, 5, handle=handle)
    state = handle.branch_state("cond")
    handle.remove()
    return out, state


@pytest.mark.parametrize("mode", ["taylor1", "hermite"])
def test_tokencache_forecasts_the_i_step_updates(mode):
    from ditcache.engine.forecast import Forecast, forecast_weights

    _, state = _forecast_run(mode, 1.0)  # ratio 1: no token is updated at a P-step
    weights = forecast_weights(Forecast(mode), [2.0, 0.0], 4.0)
    assert len(state.histories) == 4 and not any(mask.any() for mask in state.fresh.values())
    for position, history in state.histories.items():
        assert history.positions == [2.0, 0.0]
        newest, oldest = history.values
        expected = weights[0] * newest + weights[1] * oldest  # what step 4 added to every token
        assert torch.allclose(state.updates[position], expected, atol=1e-6)
    if mode == "taylor1":
        assert weights == pytest.approx([2.0, -1.0])  # u(4) = u(2) + (u(2) - u(0)) x (4 - 2) / (2 - 0)


def test_tokencache_forecast_keeps_fresher_updates_and_copy_is_the_cached_update():
    from ditcache.engine.forecast import Forecast, forecast_weights

    copied, copy_state = _forecast_run("copy", 0.5)
    assert not copy_state.histories and not copy_state.fresh  # copy keeps no history
    forecast_out, state = _forecast_run("taylor1", 0.5)
    assert not torch.equal(copied, forecast_out)
    weights = forecast_weights(Forecast.TAYLOR1, [2.0, 0.0], 4.0)
    for position, history in state.histories.items():
        fresh = state.fresh[position]  # updated at step 3 or 4: the union of both steps' tokens
        assert 0 < int(fresh[0].sum()) < fresh.shape[1]
        predicted = weights[0] * history.values[0] + weights[1] * history.values[1]
        stale = ~fresh
        assert torch.allclose(state.updates[position][stale], predicted[stale], atol=1e-6)
        assert not torch.allclose(state.updates[position][fresh], predicted[fresh], atol=1e-3)
