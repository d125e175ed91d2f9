"""`python -m ditcache.bench.rerender bench.json [--out DIR]`: the tables, the frontier report and the plots of a
saved `ditcache bench` run, re-rendered from its bench.json without running anything again."""

from __future__ import annotations

import argparse

from .report import load, report_markdown, write_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ditcache.bench.rerender",
        description="Re-render a saved bench.json: tables, frontier report, plots.",
    )
    parser.add_argument("json", help="a bench.json written by `ditcache bench`")
    parser.add_argument("--out", default=None, help="folder to write bench.json/csv/md/png into (default: print only)")
    args = parser.parse_args(argv)
    result = load(args.json)
    print(report_markdown(result))
    for path in write_files(result, args.out) if args.out else ():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
