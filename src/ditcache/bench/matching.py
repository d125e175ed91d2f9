"""Matching cost of OmniCache's token cache with and without hierarchical patches (k x k groups).

`python -m ditcache.bench.matching` times `bipartite_match` (the similarity products, the best destination
per source and the top-r selection) on random features of a few token grids for k = 1, 2, 4, 8 and prints a
markdown table with the similarity MACs (`matching_macs`) and the median seconds. Timings are for information
(this machine, torch CPU path); the MACs are exact.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..policies.omnicache_matching import Geometry, bipartite_match, layout, matching_macs

GRIDS = ((8, 96, 128), (32, 384, 8), (64, 1536, 1))  # (side, channels, rows): ref models, 512px, SD3 at 1024px


def measure(side: int, channels: int, rows: int, k: int, ratio: float = 0.5, repeats: int = 5) -> dict[str, float]:
    geometry = Geometry((1, side, side), (1, 2, 2), (1, side // k, side // k))
    plan = layout(geometry, torch.Generator().manual_seed(0))
    features = torch.randn(rows, side * side, channels, generator=torch.Generator().manual_seed(1))
    r = int(ratio * side * side)
    bipartite_match(features, plan, r)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        bipartite_match(features, plan, r)
        seconds.append(time.perf_counter() - start)
    return {"macs": matching_macs(plan, rows, channels), "seconds": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| tokens (rows x side^2, channels) | k | similarity MACs | vs k=1 | median ms | vs k=1 |")
    print("|---|---|---|---|---|---|")
    for side, channels, rows in GRIDS:
        flat = None
        for k in (1, 2, 4, 8):
            if side % k or (side // k) < 2:
                continue
            result = measure(side, channels, rows, k, repeats=args.repeats)
            flat = flat or result
            print(
                f"| {rows} x {side}x{side}, C={channels} | {k} | {result['macs']:,} | "
                f"{flat['macs'] / result['macs']:.1f}x less | {1e3 * result['seconds']:.2f} | "
                f"{flat['seconds'] / result['seconds']:.1f}x faster |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
