"""Data-parallel generation (`ditcache.parallel.data`, `ditcache generate|bench --parallel data`).

One `torchrun` launch (2 CPU processes over gloo) runs this file as a script (`_worker` below): sharded
generations of ref-image for several policies, a batch smaller than the world size, a sharded bench, then the CLI.
Rank 0 saves what it gathered; the tests compare it with one-process runs in the pytest process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ditcache
from ditcache.cli import main
from ditcache.engine.stats import Stats
from ditcache.parallel.data import merge_stats, shard_rows
from ditcache.refmodels import RefPipeline
from ditcache.refmodels.evaluate import balanced_labels

STEPS, SAMPLES = 6, 3  # 3 samples over 2 ranks: uneven shards (2, 1)
# Static schedules, and dynamic methods whose statistics are all-reduced over the ranks (DecisionSync,
# Sharding.ROWS): the whole batch's decisions.
# Token-level methods: OmniCache matches per row; TokenCache's tokens shared by the rows (per_row=False) and its
# Eq. 12 allocation come from every rank's rows (DecisionSync.gather_rows).
SHARED_TOKENS = "tokencache:selection=norm:schedule=uniform:refiners=1:lora=False:full_steps=2:per_row=False"
BATCH_POLICIES = (
    "none",
    "fora-2",
    "teacache-0.1",
    "teacache-0.3",
    "precisecache-turbo",
    "omnicache-hier",
    SHARED_TOKENS,
)
LEARNED_STEPS = 50  # TokenCache's learned predictor: the shipped ref-image profile is for 50 steps
SHARDED_DECIDES_OTHERWISE = "precisecache-turbo"  # on shard 0 alone it skips a step; on the whole batch none
# Another batch size blocks float32 matmuls differently (and torchrun runs 1 thread per process): measured max
# abs diff ~1.1e-5 for identical decisions; a different decision moves samples by > 0.1.
TOLERANCE = 5e-5
BENCH = dict(model="ref-image", steps=4, policies=("fora-2",), samples=3, repeats=1, fewer_steps=(2,))
CLI_ARGS = ["generate", "--model", "ref-image", "--parallel", "data", "--steps", "4", "--samples", "3"]
CLI_ARGS += ["--policy", "fora-2", "--out", "grid.png"]
# Tiny models run fastest on one thread; torchrun runs one per process too, so kernels block alike.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _worker(out: Path) -> None:
    """Run under torchrun: every rank calls the same things; rank 0 saves the gathered results."""
    from ditcache.bench import BenchConfig
    from ditcache.parallel import init_distributed
    from ditcache.parallel.data import bench_data_parallel, generate_data_parallel

    info = init_distributed()
    pipe = RefPipeline.from_pretrained("ref-image")
    labels = balanced_labels(SAMPLES, pipe.spec.num_classes)
    results = {}
    for policy in BATCH_POLICIES:
        results[policy] = generate_data_parallel(pipe, labels, policy, num_inference_steps=STEPS, info=info)
    results["one-sample"] = generate_data_parallel(
        pipe, labels[:1], "teacache-0.3", num_inference_steps=STEPS, info=info
    )
    results["tokencache"] = generate_data_parallel(
        pipe, labels, "tokencache", num_inference_steps=LEARNED_STEPS, info=info
    )
    bench = bench_data_parallel(BenchConfig(**BENCH), info)
    if info.is_main:  # JSON and safetensors: nothing here is pickled
        from ditcache.bench.report import to_dict

        save_file({name: result.samples.contiguous() for name, result in results.items()}, str(out / "samples.st"))
        summary = {
            name: {
                "rows": [shard.rows for shard in result.shards],
                "rank_seconds": list(result.rank_seconds),
                "stats": result.stats.to_dict() if result.stats is not None else None,
            }
            for name, result in results.items()
        }
        (out / "results.json").write_text(json.dumps({"generate": summary, "bench": to_dict(bench)}))
    rank_dir = out / f"rank{info.rank}"  # the CLI writes relative paths: a file here says which rank wrote it
    rank_dir.mkdir()
    os.chdir(rank_dir)
    sys.exit(main([*CLI_ARGS, "--json"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(rank 0's gathered results, torchrun's stdout, the run folder) of one 2-process torchrun launch."""
    out = tmp_path_factory.mktemp("data-parallel")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _load(out), done.stdout, out


@dataclasses.dataclass
class Gathered:
    """What rank 0 gathered for one generation, read back from JSON and safetensors."""

    samples: torch.Tensor
    rows: list[int]
    rank_seconds: list[float]
    stats: Stats | None

    @property
    def seconds(self) -> float:
        return max(self.rank_seconds)


def _load(out: Path) -> dict:
    from ditcache.bench.report import from_dict

    data = json.loads((out / "results.json").read_text())
    samples = load_file(str(out / "samples.st"))
    results = {
        name: Gathered(samples[name], entry["rows"], entry["rank_seconds"], _stats(entry["stats"]))
        for name, entry in data["generate"].items()
    }
    results["bench"] = from_dict(data["bench"])
    return results


def _stats(data: dict | None) -> Stats | None:
    return None if data is None else Stats.from_dict(data)


@pytest.fixture(scope="module")
def pipe():
    return RefPipeline.from_pretrained("ref-image")


def _one_process(pipe, labels, policy, latents=None, steps=STEPS):
    handle = ditcache.apply(pipe, policy)
    try:
        samples = pipe(labels, num_inference_steps=steps, latents=latents)
        return samples, handle.stats()
    finally:
        handle.remove()


def _counts(stats):
    g = stats.last
    return (
        g.forwards,
        g.steps,
        g.computed_forwards,
        g.reused_forwards,
        g.blocks_computed,
        g.macs_full,
        g.macs_executed,
    )


@pytest.mark.parametrize("policy", BATCH_POLICIES)
def test_samples_and_stats_match_one_process(launched, pipe, policy):
    results, _, _ = launched
    result = results[policy]
    labels = balanced_labels(SAMPLES, pipe.spec.num_classes)
    expected, stats = _one_process(pipe, labels, policy)
    assert result.rows == [2, 1]
    assert result.samples.shape == expected.shape
    assert (result.samples - expected).abs().max().item() <= TOLERANCE
    assert _counts(result.stats) == _counts(stats)  # MACs and steps summed over the two ranks
    assert result.stats.macs_speedup == pytest.approx(stats.macs_speedup)
    if policy == "teacache-0.3":  # skips steps; on shard 1 alone it would skip more (samples off by ~5e-3)
        assert stats.macs_executed < stats.macs_full
    assert len(result.rank_seconds) == 2 and result.seconds == max(result.rank_seconds)


def test_sharded_statistics_would_decide_otherwise(launched, pipe):
    """Without the all-reduce each rank would decide on its shard: PreciseCache's trial LFD then skips a step
    on shard 0 alone and none on the whole batch. Data parallelism matches the whole batch."""
    result = launched[0][SHARDED_DECIDES_OTHERWISE]
    labels = balanced_labels(SAMPLES, pipe.spec.num_classes)
    noise = pipe.initial_noise(SAMPLES, 0)
    shards = [shard_rows(SAMPLES, 2, rank) for rank in range(2)]
    runs = [_one_process(pipe, s.take(labels), SHARDED_DECIDES_OTHERWISE, s.take(noise)) for s in shards]
    per_shard = torch.cat([samples for samples, _ in runs])
    whole_batch, _ = _one_process(pipe, labels, SHARDED_DECIDES_OTHERWISE)
    assert runs[0][1].last.blocks_computed != runs[1][1].last.blocks_computed  # the shards alone disagree
    assert (per_shard - whole_batch).abs().max().item() > 0.01
    assert (result.samples - whole_batch).abs().max().item() <= TOLERANCE
    merged = merge_stats([stats for _, stats in runs], [s.rows for s in shards])
    assert result.stats.macs_executed != merged.macs_executed


def test_tokencache_allocates_over_the_whole_batch(launched, pipe):
    """TokenCache's Eq. 12 quantises the scores of every row of the batch: each shard alone would allocate
    other per-block counts; data parallelism gathers the rows' scores and matches the whole batch."""
    result = launched[0]["tokencache"]
    labels = balanced_labels(SAMPLES, pipe.spec.num_classes)
    expected, stats = _one_process(pipe, labels, "tokencache", steps=LEARNED_STEPS)
    assert (result.samples - expected).abs().max().item() <= TOLERANCE
    assert _counts(result.stats) == _counts(stats)
    noise = pipe.initial_noise(SAMPLES, 0)
    shard = shard_rows(SAMPLES, 2, 1)
    alone, alone_stats = _one_process(pipe, shard.take(labels), "tokencache", shard.take(noise), LEARNED_STEPS)
    assert alone_stats.last.block_tokens != stats.last.block_tokens  # shard 1 alone allocates otherwise


def test_rank_without_samples(launched, pipe):
    """1 sample over 2 ranks: rank 1 runs nothing, and TeaCache's decision group holds rank 0 alone."""
    result = launched[0]["one-sample"]
    expected, stats = _one_process(pipe, balanced_labels(1, pipe.spec.num_classes), "teacache-0.3")
    assert result.rows == [1, 0]
    assert (result.samples - expected).abs().max().item() <= TOLERANCE
    assert _counts(result.stats) == _counts(stats)


def test_bench_sums_macs_and_scores_the_whole_batch(launched):
    from ditcache.bench import BenchConfig, run_bench

    sharded = launched[0]["bench"]
    single = run_bench(BenchConfig(**BENCH), progress=False)
    assert [r.label for r in sharded.rows] == [r.label for r in single.rows]
    for row, expected in zip(sharded.rows, single.rows):
        assert row.status == expected.status == "ok"
        assert row.macs == expected.macs  # counted per shard, summed
        assert row.accuracy == pytest.approx(expected.accuracy)
        assert row.psnr == pytest.approx(expected.psnr, abs=1e-2)
        assert len(row.extra["rank_seconds"]) == 2 and row.seconds == max(row.extra["rank_seconds"])


def test_cli_writes_and_prints_on_rank_zero_only(launched):
    _, stdout, out = launched
    assert (out / "rank0" / "grid.png").is_file()
    assert not (out / "rank1" / "grid.png").exists()
    assert stdout.count("metrics: ") == 1
    assert stdout.count("data parallel: 2 processes, samples per process [2, 1]") == 1


def test_cli_without_torchrun_names_the_option(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(CLI_ARGS) == 2
    error = capsys.readouterr().err
    assert "--parallel data" in error and "torchrun --nproc_per_node" in error


def test_cli_refuses_user_pipeline(capsys):
    assert main(["generate", "--pipeline", "x.py:make", "--prompts", "p.txt", "--parallel", "data"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["bench", "--pipeline", "x.py:make", "--parallel", "data"]) == 2


@pytest.mark.parametrize("total", [0, 1, 5, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_contiguous_and_balanced(total, world):
    shards = [shard_rows(total, world, rank) for rank in range(world)]
    assert shards[0].start == 0 and shards[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    assert max(s.rows for s in shards) - min(s.rows for s in shards) <= 1


def test_shard_rows_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_rows(4, 2, 2)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
