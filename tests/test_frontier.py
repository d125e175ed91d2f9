"""The frontier report on hand-made rows (selection, interpolation, missing classes), the overhead columns, and
`ditcache compare` end to end on a tiny reference-shaped model (grid layout, equal-MACs step count)."""

import json
import math

import pytest
import torch
from PIL import Image

from ditcache.bench import BenchConfig, BenchResult, Row, load, rerender, write_files
from ditcache.bench.frontier import Point, fewer_steps_at, frontier, markdown, upper_envelope
from ditcache.bench.report import decide_share, markdown_table, report_markdown
from ditcache.bench.runner import reference_runs
from ditcache.cli_compare import HEADER_PX, compare_grid, equal_macs_steps, report, run_comparison
from ditcache.refmodels import RefModel, RefPipeline

from .test_refmodels import TINY_IMAGE

STEPS = 50


def _row(label, kind, speed, psnr, steps=STEPS, status="ok", efficiency=0.95):
    return Row(label, kind, steps, status=status, macs_speedup=speed, psnr=psnr, efficiency=efficiency)


def _rows():
    return [
        _row("uncached", "baseline", 1.0, math.inf),
        *(_row(f"fewer steps ({n})", "fewer-steps", STEPS / n, p, n) for n, p in ((33, 43.0), (25, 38.0), (17, 32.0))),
        _row("fewer steps (12)", "fewer-steps", STEPS / 12, 28.0, 12),
        _row("D", "ditcache", 1.45, 45.0),
        _row("C", "ditcache", 1.68, 39.4),
        _row("A", "ditcache", 1.95, 41.6),
        _row("B", "ditcache", 2.73, 35.5),
        _row("broken", "ditcache", 3.5, 60.0, status="failed"),  # not a candidate: it did not run
        _row("nan", "ditcache", 3.5, math.nan),  # not a candidate: no PSNR
        _row("P1", "peer", 1.86, 38.4),
        _row("P2", "peer", 2.15, 38.9),
        _row("P3", "peer", 1.22, 45.7),
    ]


def _interpolated(steps_at: float, high: tuple[int, float], low: tuple[int, float]) -> float:
    """PSNR linear in the step count (= in MACs) between two fewer-steps rows, by hand."""
    (n0, p0), (n1, p1) = high, low
    return p0 + (n0 - steps_at) / (n0 - n1) * (p1 - p0)


def test_best_rows_per_class_and_differences():
    report = frontier(_rows(), STEPS)
    by_speed = {c.speed: c for c in report.classes}
    assert [c.speed for c in report.classes] == [1.5, 2.0, 3.0]
    # 1.5x: every row >= 1.4x is in; D is the best ditcache row; P3 (1.22x) is too slow, P2 beats P1.
    one_half = by_speed[1.5]
    assert (one_half.ditcache.label, one_half.peer.label) == ("D", "P2")
    assert one_half.vs_peer == pytest.approx(45.0 - 38.9)
    # D runs at 1.45x, below the slowest fewer-steps row (1.52x): missing, not extrapolated.
    assert one_half.fewer is None and math.isnan(one_half.vs_fewer)
    assert any("fewer steps not measured around 1.45x" in why for why in one_half.missing)
    # 2x: rows >= 1.9x; fewer steps read at A's 1.95x, between 33 and 25 steps, linear in MACs.
    two = by_speed[2.0]
    assert (two.ditcache.label, two.peer.label) == ("A", "P2")
    expected = _interpolated(STEPS / 1.95, (33, 43.0), (25, 38.0))
    assert two.fewer.interpolated and (two.fewer.low.label, two.fewer.high.label) == (
        "fewer steps (33)",
        "fewer steps (25)",
    )
    assert two.fewer.psnr == pytest.approx(expected)
    assert two.fewer.steps == pytest.approx(STEPS / 1.95)
    assert two.vs_fewer == pytest.approx(41.6 - expected)
    assert two.missing == ()


def test_missing_classes_are_reported_not_crashed():
    report = frontier(_rows(), STEPS)
    three = report.classes[2]
    assert three.ditcache is None and three.peer is None
    assert math.isnan(three.vs_peer) and math.isnan(three.vs_fewer)
    assert "no ditcache row at >= 2.90x MACs (the fastest reaches 2.73x)" in three.missing
    assert "no peer row at >= 2.90x MACs (the fastest reaches 2.15x)" in three.missing
    # Without a ditcache row, fewer steps is read at the class speed itself (3x: between 17 and 12 steps).
    assert three.fewer.psnr == pytest.approx(_interpolated(STEPS / 3, (17, 32.0), (12, 28.0)))
    # A bench without peers or policies: every class still renders, with "no rows".
    bare = frontier([r for r in _rows() if r.kind in ("baseline", "fewer-steps")], STEPS)
    assert all(c.ditcache is None and c.peer is None for c in bare.classes)
    assert "no peer row at >= 1.40x MACs (no rows)" in bare.classes[0].missing
    text = markdown(bare)
    assert text.count("\n| >= ") == 3 and "| – |" in text
    with pytest.raises(ValueError, match="tolerance"):
        frontier(_rows(), STEPS, tolerance=-0.1)


def test_exact_fewer_steps_row_is_used_as_measured_and_envelopes():
    fewer = [Point(f"fewer steps ({n})", STEPS / n, p) for n, p in ((33, 43.0), (25, 38.0))]
    at_two = fewer_steps_at(fewer, 2.0, STEPS)
    assert not at_two.interpolated and at_two.psnr == 38.0 and at_two.low.label == "fewer steps (25)"
    assert fewer_steps_at(fewer, 2.5, STEPS) is None  # beyond the fastest measured row
    report = frontier(_rows(), STEPS)
    # C (1.68x, 39.4 dB) is beaten by A (1.95x, 41.6 dB) on both axes: not on the envelope.
    assert [p.label for p in report.envelopes["ditcache"]] == ["D", "A", "B"]
    assert [p.label for p in report.envelopes["peer"]] == ["P3", "P2"]
    assert upper_envelope([]) == ()


def test_overhead_columns_and_trial_forwards():
    row = _row("precisecache-turbo", "ditcache", 1.3, 40.0)
    row.seconds = 10.0
    row.extra = {
        "reused_forwards": 26,
        "forwards": 100,
        "blocks_per_forward": 4.4,
        "blocks_total": 6,
        "trial_forwards": 20,
        "decide_seconds": 0.5,
    }
    assert decide_share(row) == pytest.approx(0.05)
    plain = _row("fewer steps (25)", "fewer-steps", 2.0, 38.0, 25)
    assert math.isnan(decide_share(plain))
    table = markdown_table(BenchResult(BenchConfig(steps=STEPS), [row, plain], "test"))
    assert "decide/wall" in table and "| 5.0% |" in table and "blocks/forward, 20 trial forwards |" in table


def test_frontier_in_markdown_json_and_plot(tmp_path):
    result = BenchResult(BenchConfig(steps=STEPS, policies=("fora-2",), fewer_steps=(33, 25, 17, 12)), _rows(), "test")
    assert "Frontier (MACs speed classes)" in report_markdown(result)
    paths = write_files(result, tmp_path)
    assert "| >= 1.90x (2x) | A (1.95x, wall/MACs 0.95) | 41.60 |" in (tmp_path / "bench.md").read_text()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [c["ditcache"] and c["ditcache"]["label"] for c in data["frontier"]["classes"]] == ["D", "A", None]
    assert data["frontier"]["classes"][1]["vs_peer"] == pytest.approx(41.6 - 38.9)
    assert [r.label for r in load(tmp_path / "bench.json").rows] == [r.label for r in result.rows]
    png = next(p for p in paths if p.suffix == ".png")
    assert png.stat().st_size > 0
    # Re-rendered from the saved JSON alone: the same report.
    assert rerender.main([str(tmp_path / "bench.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "bench.md").read_text() == (tmp_path / "bench.md").read_text()


def test_equal_macs_steps_rounds_and_bounds():
    assert equal_macs_steps(50, 2.73) == 18
    assert equal_macs_steps(50, 1.0) == 50 and equal_macs_steps(4, 100.0) == 1
    with pytest.raises(ValueError, match="macs_speedup"):
        equal_macs_steps(50, 0.0)


def test_compare_writes_the_grid(tmp_path, capsys):
    pipe = RefPipeline(RefModel(TINY_IMAGE))
    labels = torch.tensor([0, 1])
    comparison = run_comparison(pipe, reference_runs(pipe, labels, None, 0, "separate"), "static-2", 6)
    # static-2 on 6 steps reuses steps 3 and 5 on both branches: 4 of 12 forwards.
    assert comparison.stats.last.reused_forwards == 4
    assert comparison.fewer_steps == round(6 / comparison.macs_speedup) == 4
    assert comparison.fewer.shape == comparison.uncached.shape == (2, 3, 32, 32)
    path = report(comparison, tmp_path / "grid.png", "tiny")
    image = Image.open(path)
    # 5 columns x 2 rows of 32x32 cells, 1 px borders, upscaled 4x, plus the title strip.
    assert image.size == ((5 * 33 + 1) * 4, (2 * 33 + 1) * 4 + HEADER_PX)
    out = capsys.readouterr().out
    cached_db, fewer_db = comparison.psnr()
    assert f"static-2 {cached_db:.2f} dB, fewer steps (4) {fewer_db:.2f} dB" in out


def test_compare_heat_map_is_black_when_the_policy_changes_nothing():
    pipe = RefPipeline(RefModel(TINY_IMAGE))
    comparison = run_comparison(pipe, reference_runs(pipe, torch.tensor([2]), None, 0, "separate"), "none", 3)
    assert comparison.fewer_steps == 3 and torch.equal(comparison.cached, comparison.uncached)
    image, top = compare_grid(comparison)
    assert top == 0.0
    cell = (33 * 4, 33 * 4)
    heat = image.crop((3 * cell[0] + 8, HEADER_PX + 8, 4 * cell[0] - 8, HEADER_PX + cell[1] - 8))
    assert max(heat.getextrema(), key=lambda e: e[1])[1] < 10  # inferno's 0 is near black


def test_compare_command_on_the_reference_model(tmp_path, capsys):
    from ditcache.cli import main

    out = tmp_path / "compare.png"
    args = ["compare", "--model", "ref-image", "--policy", "static-2", "--steps", "4", "--samples", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert Image.open(out).size == ((5 * 33 + 1) * 4, (1 * 33 + 1) * 4 + HEADER_PX)
    assert "fewer steps at equal MACs: 3 steps" in capsys.readouterr().out  # 8 forwards, 2 reused: 1.33x
    assert main([*args[:-1], "0", "--out", str(out)]) == 2
    assert "--samples must be a positive integer" in capsys.readouterr().err
    assert main(["compare", "--policy", "nope", "--steps", "2", "--samples", "1", "--out", str(out)]) == 2


def test_compare_shows_video_frames_side_by_side(tmp_path):
    from ditcache.cli import main

    out = tmp_path / "video.png"
    args = ["compare", "--model", "ref-video", "--policy", "static-2", "--steps", "4", "--samples", "1"]
    assert main([*args, "--out", str(out)]) == 0
    # 8 frames of 16x16 per cell: cells 128 wide, 16 high.
    assert Image.open(out).size == ((5 * (8 * 16 + 1) + 1) * 4, (1 * 17 + 1) * 4 + HEADER_PX)
