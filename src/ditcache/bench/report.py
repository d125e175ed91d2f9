"""Benchmark output: markdown table, CSV and JSON files, the frontier report, and the plots (Pareto + frontiers).

Overhead is shown per row: `efficiency` (wall speedup / MACs speedup, 1.0 = overhead-free), `decide/wall` (the
engine's measured decision time: the policy's own work and host syncs, block and trial compute excluded, as a
share of the row's wall time) and, in the notes, the trial forwards a method ran (their MACs are in its MACs
speedup; the engine's stats do not price them apart, so no share is shown).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

from . import frontier
from .runner import BenchConfig, BenchResult, Row

COLUMNS = (
    ("label", "method", "{}"),
    ("steps", "steps", "{}"),
    ("speedup", "wall speedup", "{:.2f}x"),
    ("macs_speedup", "MACs speedup", "{:.2f}x"),
    ("efficiency", "efficiency", "{:.2f}"),
    ("decide_share", "decide/wall", "{:.1%}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("accuracy", "class acc", "{:.3f}"),
    ("fd", "FD", "{:.2f}"),
    ("fd_spectrum", "FD spectrum", "{:.2f}"),
)


def _fmt(fmt: str, value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def decide_share(row: Row) -> float:
    """The engine's decision time per generation over the row's wall time (NaN: not a ditcache row)."""
    seconds = row.extra.get("decide_seconds")
    return seconds / row.seconds if seconds is not None and row.seconds > 0 else math.nan


_DERIVED = {"decide_share": decide_share}


def _cell(row: Row, key: str, fmt: str) -> str:
    return _fmt(fmt, _DERIVED[key](row) if key in _DERIVED else getattr(row, key))


def markdown_table(result: BenchResult) -> str:
    columns = list(COLUMNS)
    if any(not math.isnan(r.temporal) for r in result.rows):
        columns.append(("temporal", "temporal", "{:.3f}"))
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " | notes |", "|" + "---|" * (len(columns) + 1)]
    for row in result.rows:
        cells = [_cell(row, key, fmt) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + f" | {_notes(row)} |")
    return "\n".join(lines)


def frontier_report(result: BenchResult) -> frontier.Frontier:
    return frontier.frontier(result.rows, result.config.steps)


def report_markdown(result: BenchResult) -> str:
    """The rows table, then the frontier at 1.5x / 2x / 3x MACs."""
    return f"{markdown_table(result)}\n\nFrontier (MACs speed classes):\n\n{frontier.markdown(frontier_report(result))}"


def _notes(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    extra = row.extra
    if "reused_forwards" in extra:
        partial = extra.get("partial_batch_forwards", 0)
        trials = extra.get("trial_forwards", 0)
        return (
            f"{extra['reused_forwards']}/{extra['forwards']} forwards reused, "
            + (f"{partial} on part of the batch, " if partial else "")
            + f"{extra['blocks_per_forward']:.1f}/{extra['blocks_total']} blocks/forward"
            + (f", {trials} trial forwards" if trials else "")
        )
    if "cached_steps" in extra:
        return f"{extra['cached_steps']} cached steps"
    return ""


def write_files(result: BenchResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path, png_path = (out / f"bench.{ext}" for ext in ("json", "csv", "md", "png"))
    json_path.write_text(json.dumps(to_dict(result), indent=2, default=_json_default) + "\n")
    with csv_path.open("w", newline="") as handle:
        fields = [f.name for f in dataclasses.fields(Row) if f.name != "extra"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: getattr(row, k) for k in fields})
    md_path.write_text(f"machine: {result.machine}\n\n{report_markdown(result)}\n")
    pareto_plot(result, png_path)
    return [json_path, csv_path, md_path, png_path]


def _json_default(value: object) -> object:
    return str(value)


def to_dict(result: BenchResult) -> dict:
    return {
        "config": dataclasses.asdict(result.config),
        "machine": result.machine,
        # NaN / inf stay as Python's json writes them (NaN, Infinity), so the file round-trips exactly.
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "frontier": frontier_report(result).to_dict(),  # derived from the rows; `from_dict` ignores it
    }


def from_dict(data: dict) -> BenchResult:
    config = data["config"]
    config = BenchConfig(
        **{**config, "policies": tuple(config["policies"]), "fewer_steps": tuple(config["fewer_steps"])}
    )
    rows = [
        Row(
            **{
                k: (float("nan") if v is None and k not in ("label", "kind", "status", "reason") else v)
                for k, v in r.items()
            }
        )
        for r in data["rows"]
    ]
    return BenchResult(config=config, rows=rows, machine=data["machine"])


def load(path: str | Path) -> BenchResult:
    return from_dict(json.loads(Path(path).read_text()))


def pareto_plot(result: BenchResult, path: str | Path) -> Path:
    """Left: every row, wall-clock speedup vs PSNR. Right: the three frontiers (ditcache, peers, fewer steps),
    PSNR vs MACs speedup, with the speed classes' floors dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, right) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=110)
    ok = [r for r in result.rows if r.status == "ok" and r.kind != "baseline" and math.isfinite(r.psnr)]
    fewer = sorted((r for r in ok if r.kind == "fewer-steps"), key=lambda r: r.speedup)
    if fewer:
        ax.plot([r.speedup for r in fewer], [r.psnr for r in fewer], "-o", color="gray", label="fewer steps")
        for r in fewer:
            ax.annotate(
                str(r.steps), (r.speedup, r.psnr), fontsize=7, color="gray", xytext=(3, 3), textcoords="offset points"
            )
    for kind, marker, color in (("ditcache", "s", "tab:blue"), ("peer", "^", "tab:orange")):
        points = [r for r in ok if r.kind == kind]
        ax.scatter([r.speedup for r in points], [r.psnr for r in points], marker=marker, color=color, label=kind)
        for r in points:
            ax.annotate(r.label, (r.speedup, r.psnr), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("wall-clock speedup vs uncached (x)")
    ax.set_ylabel("PSNR vs uncached output (dB)")
    ax.set_title(f"{result.config.model}, {result.config.steps} steps: speed vs fidelity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    frontier.plot(frontier_report(result), right, f"{result.config.model}: frontiers (upper envelopes)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
