"""Context parallelism (Ulysses over gloo, 2 CPU processes): cached outputs equal one process's, decisions in
lockstep on every rank; the decision choke point; the errors of the context-parallel entry points."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

import ditcache
from ditcache.engine.decisions import DecisionSync, decision_group
from ditcache.numerics import rel_l1
from ditcache.parallel import enable_context_parallel, set_decision_group
from ditcache.testing import euler_sample, tiny_inputs, tiny_model

WORKER = Path(__file__).with_name("_cp_worker.py")
IMAGE_PRESETS = (
    "none",
    "static-2",
    "fora-2",
    "fora-hermite-2x",
    "teacache-0.1",
    "precisecache-base",
    "precisecache-flash",
    "mixcache-acc",
    "omnicache-traj-slow",
    "omnicache-layered-2x",
    "tokencache",
    "tokencache:selection=random:per_row=False",
    "omnicache-hier",
    "omnicache-merge",
)
# token-level methods: the one-process run selects in one band per rank (`token_bands=2`, tests/_cp_worker.py)
VIDEO_PRESETS = (
    "fora-2",
    "teacache-0.2",
    "precisecache-flash",
    "omnicache-hier",
    "tokencache:selection=norm:schedule=uniform:refiners=1:lora=False",
)
TINY_PRESETS = (
    "none",
    "fora-2",
    "teacache-0.2",
    "static-2",
    "omnicache-hier:token_ratio=0.5",
    "tokencache:selection=random:schedule=uniform:refiners=0:lora=False:full_steps=2",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path, model: str, steps: int, presets: tuple[str, ...]) -> tuple[dict, dict, dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(out),
        model,
        str(steps),
        *presets,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks[0], ranks[1], json.loads((out / "single.json").read_text())


@pytest.fixture(scope="module")
def image_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    return _run_ranks(tmp_path_factory.mktemp("cp-image"), "ref-image", 50, IMAGE_PRESETS)


@pytest.fixture(scope="module")
def video_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    return _run_ranks(tmp_path_factory.mktemp("cp-video"), "ref-video", 20, VIDEO_PRESETS)


@pytest.fixture(scope="module")
def qwen_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    return _run_ranks(tmp_path_factory.mktemp("cp-qwen"), "tiny:qwenimage", 8, TINY_PRESETS)


def _reuses_something(preset: dict) -> bool:
    trace = preset["trace"]
    return preset["reused_forwards"] > 0 or any(skipped > 0 or min(fractions) < 1.0 for *_, skipped, fractions in trace)


@pytest.mark.parametrize("preset", IMAGE_PRESETS)
def test_ulysses_flux_matches_one_process(image_ranks: tuple[dict, dict, dict], preset: str) -> None:
    rank0, rank1, single = image_ranks
    for rank in (rank0, rank1):
        assert rank["presets"][preset]["max_abs_diff"] <= 1e-5
    # the same decision at every forward, on both ranks and as in one process
    assert rank0["presets"][preset]["trace"] == rank1["presets"][preset]["trace"] == single[preset]
    assert len(single[preset]) == 100  # 50 steps x (cond, uncond)
    if preset != "none":
        assert _reuses_something(rank0["presets"][preset]), preset


def test_ulysses_without_caching_is_what_context_parallelism_gives(image_ranks: tuple[dict, dict, dict]) -> None:
    rank0, rank1, _ = image_ranks
    # "none" hooks everything and reuses nothing: bit-identical to the context-parallel model without ditcache
    # (both differ from one process by the same Ulysses rounding).
    assert rank0["presets"]["none"]["max_abs_diff"] == rank0["plain"] == rank1["plain"]
    assert rank0["plain"] <= 1e-5


@pytest.mark.parametrize("preset", VIDEO_PRESETS)
def test_ulysses_wan_matches_one_process(video_ranks: tuple[dict, dict, dict], preset: str) -> None:
    rank0, rank1, single = video_ranks
    assert max(rank0["presets"][preset]["max_abs_diff"], rank1["presets"][preset]["max_abs_diff"]) <= 1e-5
    assert rank0["presets"][preset]["trace"] == rank1["presets"][preset]["trace"] == single[preset]
    assert _reuses_something(rank0["presets"][preset]), preset


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_ulysses_qwenimage_hand_written_loop(qwen_ranks: tuple[dict, dict, dict], preset: str) -> None:
    rank0, rank1, single = qwen_ranks
    assert max(rank0["presets"][preset]["max_abs_diff"], rank1["presets"][preset]["max_abs_diff"]) <= 1e-5
    assert rank0["presets"][preset]["trace"] == rank1["presets"][preset]["trace"] == single[preset]
    assert len(single[preset]) == 16  # 8 steps x (cond, uncond)
    assert preset == "none" or _reuses_something(rank0["presets"][preset])


def test_a_statistic_that_differs_between_shards_gives_one_value(image_ranks: tuple[dict, dict, dict]) -> None:
    rank0, rank1, _ = image_ranks
    s0, s1 = rank0["shard_statistic"], rank1["shard_statistic"]
    assert s0["local"] != pytest.approx(s1["local"], rel=0.1)  # thresholding these would split the ranks
    assert s0["synced"] == s1["synced"]  # bitwise: one decision
    assert s0["synced"] == pytest.approx(s0["global"], rel=1e-6)  # sums and counts: exact on uneven shards


def test_learned_tokencache_needs_diffusers_context_parallelism(image_ranks: tuple[dict, dict, dict]) -> None:
    for rank in image_ranks[:2]:  # a decision group set by hand has nothing to shard the predictor's attention
        assert "selection='learned'" in rank["token_error"] and "enable_context_parallel" in rank["token_error"]


# ---------------------------------------------------------------- one process


def test_decision_sync_without_group_is_numerics_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    sync = DecisionSync(None)
    assert not sync.active
    assert sync.rel_l1(a, b) == rel_l1(a, b)
    residuals = [a, None, b]
    expected = math.sqrt(float(a.pow(2).sum()) + float(b.pow(2).sum()))
    assert sync.norm(residuals) == expected
    assert sync.norm([None]) == 0.0
    assert sync.reductions == 0


def test_no_group_without_context_parallelism() -> None:
    model = tiny_model("flux")
    assert decision_group(model) is None
    set_decision_group(model, None)  # nothing set: still nothing, no error
    assert decision_group(model) is None


def test_enable_context_parallel_errors() -> None:
    with pytest.raises(TypeError, match="_cp_plan"):
        enable_context_parallel(tiny_model("dit"))
    with pytest.raises(RuntimeError, match="init_distributed"):
        enable_context_parallel(tiny_model("flux"))


def test_context_parallelism_enabled_after_apply_is_refused() -> None:
    model = tiny_model("flux")
    inputs = tiny_inputs("flux")
    handle = ditcache.apply(model, "fora-2")
    euler_sample(model, "flux", inputs, steps=3, handle=handle)  # fine before
    # what `enable_parallelism` records on the model, set after apply
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    try:
        with pytest.raises(RuntimeError, match="enable it first"):
            euler_sample(model, "flux", inputs, steps=3, handle=handle)
    finally:
        model._parallel_config = None
        handle.remove()


# ---------------------------------------------------------------- command line


def _torchrun_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), "-m", "ditcache", "generate", "--model", "ref-image", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_cli_ulysses_generates_once_on_rank_zero(tmp_path: Path) -> None:
    done = _torchrun_cli(tmp_path, "--parallel", "ulysses", "--steps", "4", "--samples", "2", "--policy", "fora-2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("--parallel ulysses over 2 ranks") == 1  # rank 0 alone reports
    assert done.stdout.count("metrics: ") == 1
    assert (tmp_path / "samples.png").is_file()


def test_cli_ring_on_cpu_says_why(tmp_path: Path) -> None:
    done = _torchrun_cli(tmp_path, "--parallel", "ring", "--steps", "2", "--samples", "2")
    assert done.returncode != 0
    assert "log-sum-exp" in done.stdout + done.stderr


def test_cli_context_parallel_without_torchrun(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ditcache.cli import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["generate", "--model", "ref-image", "--parallel", "ulysses"]) == 2
    assert "torchrun --nproc_per_node N -m ditcache generate --parallel ulysses" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: bench takes none|data
        main(["bench", "--model", "ref-image", "--parallel", "ulysses"])
    assert "invalid choice: 'ulysses'" in capsys.readouterr().err
