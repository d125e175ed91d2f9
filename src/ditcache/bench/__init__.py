"""The benchmark: every policy against fewer steps and the peers, speed and quality, in one run."""

from .report import load, markdown_table, write_files
from .runner import BenchConfig, BenchResult, Row, run_bench

__all__ = ["BenchConfig", "BenchResult", "Row", "load", "markdown_table", "run_bench", "write_files"]
