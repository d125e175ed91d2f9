"""The benchmark harness on a tiny reference-shaped model: rows, columns, ratios, peers, files."""

import importlib.util
import math
import statistics

import pytest

from ditcache.bench import BenchConfig, load, markdown_table, run_bench, write_files
from ditcache.bench.peers import cache_dit_peers
from ditcache.refmodels import RefModel, RefPipeline

from .test_refmodels import TINY_IMAGE


@pytest.fixture(scope="module")
def result():
    pipe = RefPipeline(RefModel(TINY_IMAGE))
    config = BenchConfig(
        model="ref-image", steps=6, policies=("static-2", "fora-2"), peers=True, samples=4, repeats=2, fewer_steps=(3,)
    )
    return run_bench(config, pipe=pipe, progress=False)


def test_all_rows_and_columns(result):
    labels = [r.label for r in result.rows]
    assert labels[:4] == ["uncached 6 steps", "fewer steps (3)", "static-2", "fora-2"]
    assert any(label.startswith("diffusers FBCache") for label in labels)
    base = result.rows[0]
    assert base.speedup == pytest.approx(1.0) and base.macs_speedup == pytest.approx(1.0)
    assert base.psnr == math.inf  # the baseline is its own reference
    for row in result.rows:
        if row.status == "ok":
            fields = ("seconds", "speedup", "macs_speedup", "efficiency", "psnr", "ssim", "accuracy", "fd")
            fields += ("fd_spectrum",)
            for field in fields:
                assert not math.isnan(getattr(row, field)), (row.label, field)
    table = markdown_table(result)
    assert "MACs speedup" in table and "fewer steps (3)" in table


def test_ratios_come_from_the_same_run(result):
    base = result.rows[0]
    fewer = next(r for r in result.rows if r.kind == "fewer-steps")
    assert fewer.speedup == pytest.approx(base.seconds / fewer.seconds)
    # MACs are counted by the same flop counter for every row: half the steps, half the MACs.
    assert fewer.macs_speedup == pytest.approx(2.0, rel=1e-6)
    static = next(r for r in result.rows if r.label == "static-2")
    assert static.extra["reused_forwards"] == 4  # steps 3 and 5, both branches
    assert static.macs_speedup == pytest.approx(static.extra["stats_macs_speedup"], rel=1e-6)
    assert static.efficiency == pytest.approx(static.speedup / static.macs_speedup)


def test_missing_peer_is_skipped_not_crashed(result, monkeypatch):
    rows = [r for r in result.rows if r.label.startswith("cache-dit")]
    if importlib.util.find_spec("cache_dit") is None:
        assert [r.status for r in rows] == ["skipped"] and "not installed" in rows[0].reason
    else:
        assert rows and all(r.status in ("ok", "failed") for r in rows)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "cache_dit" else real_find_spec(n, *a))
    variants = cache_dit_peers(6, num_blocks=2)
    assert len(variants) == 1 and not variants[0].available


def test_results_round_trip(result, tmp_path):
    paths = write_files(result, tmp_path)
    assert {p.suffix for p in paths} == {".json", ".csv", ".md", ".png"}
    loaded = load(tmp_path / "bench.json")
    assert [r.label for r in loaded.rows] == [r.label for r in result.rows]
    for a, b in zip(loaded.rows, result.rows):
        for field in ("speedup", "macs_speedup", "psnr", "accuracy"):
            x, y = getattr(a, field), getattr(b, field)
            assert (math.isnan(x) and math.isnan(y)) or x == y
    assert loaded.config.steps == 6


def test_batched_cfg_bench_runs_one_forward_per_step():
    pipe = RefPipeline(RefModel(TINY_IMAGE))
    config = BenchConfig(steps=6, policies=("static-2",), samples=2, repeats=1, fewer_steps=(3,), cfg_mode="batched")
    result = run_bench(config, pipe=pipe, progress=False)
    static = next(r for r in result.rows if r.label == "static-2")
    assert static.status == "ok" and static.extra["reused_forwards"] == 2  # steps 3 and 5, one forward each
    with pytest.raises(ValueError, match="cfg_mode"):
        BenchConfig(cfg_mode="joint")


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="--policies"):
        run_bench(BenchConfig(steps=2, policies=("nope",)), pipe=RefPipeline(RefModel(TINY_IMAGE)), progress=False)


def test_policy_list_splits_outside_parentheses():
    from ditcache.cli_pipeline import split_policies

    assert split_policies("fora-2,mixcache-acc:granularities=('step','cfg'),omnicache-traj-slow") == (
        "fora-2",
        "mixcache-acc:granularities=('step','cfg')",
        "omnicache-traj-slow",
    )


def test_taylorseer_peer_names_every_family_attention() -> None:
    """diffusers TaylorSeer's default identifiers miss Wan's attn1 / attn2: the peer passes the adapter's."""
    import re

    from ditcache.bench.peers import taylorseer_identifiers
    from ditcache.testing import tiny_model

    for family, expected in (("wan", {"attn1", "attn2"}), ("flux", {"attn"}), ("latte", {"attn1", "attn2"})):
        model = tiny_model(family)
        patterns = taylorseer_identifiers(model)
        matched = {name for name, _ in model.named_modules() if any(re.fullmatch(p, name) for p in patterns)}
        assert matched and {name.rsplit(".", 1)[-1] for name in matched} == expected, family


def test_rounds_rotate_and_the_median_round_is_reported():
    """Each timed round starts one row later (no row always runs first, right after the warm-up), and a row's
    seconds are the median of its rounds, all of which are kept."""
    import torch

    from ditcache.bench.runner import run_variants

    pipe = RefPipeline(RefModel(TINY_IMAGE))
    config = BenchConfig(steps=6, policies=(), samples=2, repeats=2, fewer_steps=(3, 2))
    labels = torch.tensor([0, 1])
    calls: list[int] = []

    def run_for(steps: int):
        def run():
            calls.append(steps)
            return pipe(labels, num_inference_steps=steps, seed=0)

        return run

    with torch.no_grad():
        result = run_variants(config, pipe, run_for, lambda out, ref: {"psnr": 0.0}, progress=False)
    # warm-up, round 1 (6, 3, 2), round 2 rotated (3, 2, 6), then one MACs-counted generation per row
    assert calls == [6, 6, 3, 2, 3, 2, 6, 6, 3, 2]
    for row in result.rows:
        assert len(row.rounds) == 2 and row.seconds == statistics.median(row.rounds)
    assert result.rows[0].speedup == 1.0


def test_bench_names_the_host_allocator(result) -> None:
    import os

    from ditcache.bench.runner import allocator_description

    assert result.machine.endswith(allocator_description(os.environ))

    assert allocator_description({}) == "default allocator"
    assert allocator_description({"LD_PRELOAD": "/usr/lib/libfoo.so", "PATH": "/bin"}) == "default allocator"
    environ = {
        "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2:/usr/lib/libfoo.so",
        "MALLOC_TRIM_THRESHOLD_": "4294967296",
        "MALLOC_MMAP_THRESHOLD_": "1073741824",
    }
    assert allocator_description(environ) == (
        "libjemalloc.so.2, MALLOC_TRIM_THRESHOLD_=4294967296, MALLOC_MMAP_THRESHOLD_=1073741824"
    )
