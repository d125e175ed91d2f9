"""`BlockCall.run_tokens`: token-subset block runs on Flux, SD3 and Wan, their accounting, and grid helpers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import ditcache
from ditcache.adapters import LatentGrid
from ditcache.engine.macs import measure_costs
from ditcache.engine.tokens import frame_tokens, patch_groups, token_coordinates, window_tokens
from ditcache.testing import euler_sample, tiny_inputs, tiny_model


@dataclasses.dataclass(frozen=True)
class _ProbeConfig(ditcache.PolicyConfig):
    """Test-only: at step 1 run every block three ways and keep what the test compares."""

    keep: int = 5
    seed: int = 0


@ditcache.register_policy(_ProbeConfig)
class _ProbePolicy(ditcache.Policy):
    uses_block_hooks = True

    def __init__(self, config: _ProbeConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.seen: list[dict[str, Any]] = []

    def block(self, call: Any) -> Any:
        if call.info.step != 1:
            return call.run()
        stream = call.arguments["hidden_states"]
        batch, tokens = stream.shape[:2]
        g = torch.Generator().manual_seed(self.config.seed + call.ref.position)
        index = torch.stack([torch.randperm(tokens, generator=g)[: self.config.keep] for _ in range(batch)])
        base = torch.randn(stream.shape, generator=g)
        full = call.run()
        self.seen.append(
            {
                "call": call,
                "index": index,
                "base": base,
                "full": full,
                "all": call.run_tokens(torch.arange(tokens), base),
                "none": call.run_tokens(torch.empty(0, dtype=torch.long), base),
                "subset": call.run_tokens(index, base),
            }
        )
        return full


def _by_hand(family: str, call: Any, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block run on the gathered inputs, written out per family: (image stream (B, k, C), text or None)."""
    module, a = call.ref.module, call.arguments
    forward = type(module).forward
    hidden = a["hidden_states"]
    rows = range(hidden.shape[0])
    if family == "flux":  # shared rotary table [text; image]: one row at a time
        text = a["encoder_hidden_states"].shape[1]
        images, texts = [], []
        for b in rows:
            keep = torch.cat([torch.arange(text), index[b] + text])
            rotary = tuple(t[keep] for t in a["image_rotary_emb"])
            enc, img = forward(
                module,
                hidden_states=hidden[b : b + 1, index[b]],
                encoder_hidden_states=a["encoder_hidden_states"][b : b + 1],
                temb=a["temb"][b : b + 1],
                image_rotary_emb=rotary,
            )
            images.append(img)
            texts.append(enc)
        return torch.cat(images), torch.cat(texts)
    gathered = torch.stack([hidden[b, index[b]] for b in rows])
    if family == "sd3":
        enc, img = forward(module, gathered, a["encoder_hidden_states"], a["temb"])
        return img, enc
    rotary = tuple(torch.stack([t[0, index[b]] for b in rows]) for t in a["rotary_emb"])  # (B, k, 1, D)
    return forward(module, gathered, a["encoder_hidden_states"], a["temb"], rotary), None


def _stream(call: Any, output: Any) -> torch.Tensor:
    return call.outputs_of(output)["hidden_states"]


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_run_tokens_matches_run_and_a_gather_by_hand(family):
    model = tiny_model(family)
    handle = ditcache.apply(model, _ProbeConfig(keep=5))
    euler_sample(model, family, tiny_inputs(family, batch=2), 2)
    seen = handle.policy.seen
    assert len(seen) == len(handle.policy.model_view.blocks)
    for probe in seen:
        call, index, base = probe["call"], probe["index"], probe["base"]
        full, subset = probe["full"], probe["subset"]
        # All tokens in order: the block's own run, bit for bit.
        for a, b in zip(call.outputs_of(probe["all"]).values(), call.outputs_of(full).values()):
            assert (a is None and b is None) or torch.equal(a, b)
        # No tokens: the base.
        assert torch.equal(_stream(call, probe["none"]), base)
        # A random subset per row: kept tokens as computed by hand, the others from the base.
        image, text = _by_hand(family, call, index)
        out = _stream(call, subset)
        for b in range(2):
            torch.testing.assert_close(out[b, index[b]], image[b], rtol=0, atol=1e-6)
            untouched = torch.ones(out.shape[1], dtype=torch.bool)
            untouched[index[b]] = False
            assert torch.equal(out[b, untouched], base[b, untouched])
        if text is not None and call.outputs_of(subset)["encoder_hidden_states"] is not None:
            torch.testing.assert_close(call.outputs_of(subset)["encoder_hidden_states"], text, rtol=0, atol=1e-6)
    handle.remove()


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_rows_are_independent_of_each_other(family):
    """Row 0's output from a per-row run does not depend on row 1's input or indices."""
    model = tiny_model(family)
    outs = []
    for seed in (0, 1):
        handle = ditcache.apply(model, _ProbeConfig(keep=5, seed=0))
        inputs = tiny_inputs(family, batch=2)
        if seed:
            inputs["hidden_states"][1] = torch.randn_like(inputs["hidden_states"][1])
        euler_sample(model, family, inputs, 2)
        outs.append([(p["index"], _stream(p["call"], p["subset"])) for p in handle.policy.seen])
        handle.remove()
    for (index_a, a), (index_b, b) in zip(*outs):
        assert torch.equal(index_a[0], index_b[0])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class _FirstTokensConfig(ditcache.PolicyConfig):
    """Test-only: after step 0, every block runs on its first `keep` tokens; the rest come from step 0."""

    keep: int = 16


@ditcache.register_policy(_FirstTokensConfig)
class _FirstTokensPolicy(ditcache.Policy):
    uses_block_hooks = True

    def __init__(self, config: _FirstTokensConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.cache: dict[int, Any] = {}
        self.example: dict[int, dict[str, Any]] = {}

    def block(self, call: Any) -> Any:
        position = call.ref.position
        if call.info.step == 0:
            output = call.run()
            self.cache[position] = call.outputs_of(output)
            return output
        self.example[position] = dict(call.arguments)
        return call.run_tokens(torch.arange(self.config.keep), self.cache[position])


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_stats_count_executed_tokens_and_price_them_at_that_shape(family):
    model = tiny_model(family)
    steps, keep = 4, 6 if family == "sd3" else 16
    handle = ditcache.apply(model, _FirstTokensConfig(keep=keep))
    euler_sample(model, family, tiny_inputs(family), steps)
    stats = handle.stats().last
    view = handle.policy.model_view
    tokens = 64 if family == "flux" else (16 if family == "sd3" else 48)
    assert stats.block_tokens == [tokens + (steps - 1) * keep] * view.num_blocks
    assert stats.token_fraction == pytest.approx((tokens + (steps - 1) * keep) / (steps * tokens))
    # Executed MACs: step 0 in full, then each block measured on the gathered 16-token inputs.
    full = stats.macs_full // steps
    blocks_full = measure_costs(lambda: None, model, [])  # nothing: proves the counter starts at zero
    assert blocks_full.total == 0
    subset_costs, block_costs = [], []
    for ref in view.blocks:
        arguments = handle.policy.example[ref.position]
        for costs, a in ((block_costs, arguments), (subset_costs, _gather_first(family, arguments, keep))):
            costs.append(measure_costs(lambda m=ref.module, a=a: type(m).forward(m, **a), model, []).total)
    outside = full - sum(block_costs)
    assert stats.macs_executed == steps * outside + sum(block_costs) + (steps - 1) * sum(subset_costs)
    # Attention is not linear in the token fraction: the measured cost differs from the linear guess.
    assert sum(subset_costs) != round(sum(block_costs) * keep / tokens)
    handle.remove()


def _gather_first(family: str, a: dict[str, Any], keep: int) -> dict[str, Any]:
    g = dict(a, hidden_states=a["hidden_states"][:, :keep])
    if family == "flux":
        text = a["encoder_hidden_states"].shape[1]
        g["image_rotary_emb"] = tuple(t[: text + keep] for t in a["image_rotary_emb"])
    if family == "wan":
        g["rotary_emb"] = tuple(t[:, :keep] for t in a["rotary_emb"])
    return g


def test_bad_index_and_base_are_clear_errors():
    model = tiny_model("flux")
    errors = []

    @dataclasses.dataclass(frozen=True)
    class _BadConfig(ditcache.PolicyConfig):
        pass

    @ditcache.register_policy(_BadConfig)
    class _BadPolicy(ditcache.Policy):
        uses_block_hooks = True

        def block(self, call: Any) -> Any:
            base = call.arguments["hidden_states"]
            for index, b in (
                (torch.tensor([0.5]), base),
                (torch.tensor([64]), base),
                (torch.zeros(3, 2, dtype=torch.long), base),
                (torch.tensor([1]), base[:, :3]),
            ):
                with pytest.raises(ValueError) as info:
                    call.run_tokens(index, b)
                errors.append(str(info.value))
            return call.run()

    handle = ditcache.apply(model, _BadConfig())
    euler_sample(model, "flux", tiny_inputs("flux"), 1)
    handle.remove()
    assert any("int64" in e for e in errors) and any("[0, 64)" in e for e in errors)
    assert any("shape (k,) or (batch=1, k)" in e for e in errors) and any("base must hold" in e for e in errors)


def test_grid_helpers_map_tokens_to_frames_windows_and_patches():
    grid = LatentGrid(frames=2, height=4, width=4)
    coords = token_coordinates(grid)
    assert coords[0].tolist() == [0, 0, 0] and coords[5].tolist() == [0, 1, 1] and coords[16].tolist() == [1, 0, 0]
    assert frame_tokens(grid, [1]).tolist() == list(range(16, 32))
    window = window_tokens(grid, rows=range(1, 3), columns=range(2, 4), frames=range(0, 1))
    assert window.tolist() == [6, 7, 10, 11]
    patches = patch_groups(grid, 2)
    assert patches.shape == (8, 4) and patches[0].tolist() == [0, 1, 4, 5] and patches[4].tolist() == [16, 17, 20, 21]
    assert sorted(patches.flatten().tolist()) == list(range(32))
    # Time-innermost order: token i is frame i % 2.
    hwf = LatentGrid(frames=2, height=4, width=4, order="hwf")
    assert token_coordinates(hwf)[:3].tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert frame_tokens(hwf, [1]).tolist() == list(range(1, 32, 2))
    assert torch.equal(token_coordinates(hwf)[patch_groups(hwf, 4)[1]][:, 0], torch.ones(16, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be a positive integer dividing"):
        patch_groups(grid, 3)
    with pytest.raises(ValueError, match="frames must lie in"):
        frame_tokens(grid, [2])
    with pytest.raises(ValueError, match="order must be one of"):
        LatentGrid(1, 2, 2, order="whf")
