"""A lean OmniCache study on a reference model: one generation per variant, the engine's MACs, quality metrics.

`python -m ditcache.bench.omnicache_study --model ref-latte --samples 8 --policies omnicache-hier,...` runs the
uncached baseline, every policy, then uncached sampling with fewer steps at each policy's MACs (round(steps /
MACs speedup)), all on the same labels and seed, and prints a markdown table: wall speedup (one timed
generation each, so noisier than `ditcache bench`'s interleaved medians), MACs speedup (the transformer's, from
the engine's flop-counted block costs; fewer steps: steps / fewer), efficiency, PSNR / SSIM against the
uncached output, FD (and temporal consistency for videos) from the shipped classifier. It exists because
`ditcache bench` also flop-counts one whole generation per variant, which a loaded 2-core machine could not
afford for these tables; use `ditcache bench` where it can.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..api import apply
from ..calibration.profiles import ProfileMismatchError
from ..refmodels import RefPipeline
from ..refmodels.evaluate import balanced_labels, score


def run_study(model: str, samples: int, steps: int, policies: list[str], guidance: float = 4.0) -> list[dict]:
    pipe = RefPipeline.from_pretrained(model)
    labels = balanced_labels(samples, pipe.spec.num_classes)

    def generate(num_steps: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = pipe(labels, num_inference_steps=num_steps, guidance_scale=guidance, seed=0)
        return out, time.perf_counter() - start

    reference, base_seconds = generate(steps)
    rows = [{"label": f"uncached {steps} steps", "steps": steps, "seconds": base_seconds, "macs_speedup": 1.0}]
    outputs = [reference]
    for spec in policies:
        handle = apply(pipe, spec)
        try:
            out, seconds = generate(steps)
            stats = handle.stats().last
        except ProfileMismatchError as error:  # e.g. no layered profile yet: report, go on
            print(f"skipped {spec}: {error}")
            continue
        finally:
            handle.remove()
        rows.append(
            {
                "label": spec,
                "steps": steps,
                "seconds": seconds,
                "macs_speedup": stats.macs_speedup,
                "token_fraction": stats.token_fraction,
            }
        )
        outputs.append(out)
    fewer = sorted({max(1, round(steps / row["macs_speedup"])) for row in rows[1:]} - {steps}, reverse=True)
    for count in fewer:
        out, seconds = generate(count)
        rows.append(
            {"label": f"fewer steps ({count})", "steps": count, "seconds": seconds, "macs_speedup": steps / count}
        )
        outputs.append(out)
    for row, out in zip(rows, outputs):
        row["wall_speedup"] = base_seconds / row["seconds"]
        row["efficiency"] = row["wall_speedup"] / row["macs_speedup"]
        row.update(score(model, out, labels, None if out is reference else reference))
    return rows


def markdown(rows: list[dict]) -> str:
    video = "temporal" in rows[0]
    head = "| method | steps | wall speedup | MACs speedup | efficiency | PSNR dB | SSIM | FD |" + (
        " temporal |" if video else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        psnr = r.get("psnr", float("inf"))
        line = (
            f"| {r['label']} | {r['steps']} | {r['wall_speedup']:.2f}x | {r['macs_speedup']:.2f}x | "
            f"{r['efficiency']:.2f} | {psnr:.2f} | {r.get('ssim', 1.0):.3f} | {r['fd']:.2f} |"
        )
        lines.append(line + (f" {r['temporal']:.3f} |" if video else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ref-latte")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--policies", default="omnicache-hier")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows = run_study(args.model, args.samples, args.steps, [p for p in args.policies.split(",") if p])
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
