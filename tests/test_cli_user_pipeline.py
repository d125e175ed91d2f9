"""`ditcache calibrate | generate | bench --pipeline SPEC`: the command line on the user's own diffusers pipeline
(a tiny real FluxPipeline saved with `save_pretrained`, or built by a factory), run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import ditcache
from ditcache.cli import main
from ditcache.userpipe import generate, load_pipeline, pipeline_kwargs, read_prompts

from .test_pipeline_e2e import tiny_flux_pipeline

TESTS = Path(__file__).parent
CALL = dict(negative_prompt="blurry", true_cfg_scale=3.0, height=16, width=16, max_sequence_length=16)
CALL_ARGS = [a for k, v in CALL.items() for a in ("--call", f"{k}={v}")]
FACTORY = "tests.test_pipeline_e2e:tiny_flux_pipeline"


def not_a_pipeline():
    return {"transformer": None}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder written by save_pretrained, prompts file with a comment and a blank line)."""
    root = tmp_path_factory.mktemp("user-pipeline")
    tiny_flux_pipeline().save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("# my prompts\na photo of a cat\n\na red dog\n")
    return str(root / "pipe"), str(prompts)


def test_calibrate_saved_pipeline_then_apply_finds_the_profile(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path / "profiles"))
    folder, prompts = saved
    assert main(["calibrate", "mixcache", "--pipeline", folder, "--prompts", prompts, "--steps", "12", *CALL_ARGS]) == 0
    out = capsys.readouterr().out
    profiles = list((tmp_path / "profiles").glob("mixcache-*-12.json"))
    assert len(profiles) == 1 and f"saved {profiles[0]}" in out
    assert "theta " in out and "impact: step" in out and "guidance 3.0" in out and "mixcache-acc" in out

    pipe = load_pipeline(folder)  # a fresh load: same weights, same fingerprint
    handle = ditcache.apply(pipe, "mixcache-acc")  # no path: found in the user profile directory
    images = generate(pipe, ["a photo of a cat", "a red dog"], 12, 0, CALL)
    stats = handle.stats().last
    handle.remove()
    assert torch.isfinite(images).all() and images.shape == (2, 3, 16, 16)
    assert stats.forwards == 24 and stats.macs_speedup > 1.0


def test_generate_writes_the_grid_and_prints_psnr(saved, tmp_path, capsys):
    folder, prompts = saved
    grid = tmp_path / "out" / "grid.png"
    argv = ["generate", "--pipeline", folder, "--prompts", prompts, "--steps", "8", "--policy", "fora-2"]
    assert main([*argv, *CALL_ARGS, "--out", str(grid), "--json"]) == 0
    out = capsys.readouterr().out
    assert "wall-clock speedup" in out and "MACs speedup" in out and "PSNR vs uncached: cached " in out
    payload = json.loads(out[out.index("{\n") :])
    fewer = next(k for k in payload["psnr"] if k.startswith("fewer steps"))
    assert 2 <= int(fewer.split("(")[1].rstrip(")")) < 8 and payload["stats"]["policy"]
    assert all(v > 0 for v in payload["psnr"].values())
    # 3 rows (uncached, cached, fewer steps) x 2 prompts of 16 px, 1 px borders, upscaled 4x.
    assert Image.open(grid).size == ((2 * 17 + 1) * 4, (3 * 17 + 1) * 4)


def test_bench_table_and_json(saved, tmp_path, capsys):
    folder, prompts = saved
    argv = ["bench", "--pipeline", folder, "--prompts", prompts, "--steps", "6", "--policies", "fora-2"]
    assert main([*argv, "--repeats", "1", *CALL_ARGS, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| method | steps | MACs speedup | wall speedup | PSNR dB |" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["uncached 6 steps", "fewer steps (4)", "fewer steps (3)", "fewer steps (2)", "fora-2"]
    assert all(r["status"] == "ok" for r in data["rows"]), data["rows"]
    fora = data["rows"][-1]
    assert fora["macs_speedup"] > 1.0 and 0 < fora["psnr"] < float("inf")
    assert data["call"] == CALL and data["prompts"] == ["a photo of a cat", "a red dog"]


def test_factory_forms(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(TESTS.parent)
    reference = tiny_flux_pipeline()
    file_spec = "tests/test_pipeline_e2e.py:tiny_flux_pipeline"
    for spec in (FACTORY, file_spec, f"{TESTS}/test_pipeline_e2e.py:tiny_flux_pipeline"):
        pipe = load_pipeline(spec)
        assert type(pipe).__name__ == "FluxPipeline"
        for a, b in zip(pipe.transformer.parameters(), reference.transformer.parameters()):
            assert torch.equal(a, b)
    grid = tmp_path / "uncached.png"
    argv = ["generate", "--pipeline", file_spec, "--prompts", saved[1], "--steps", "4", "--out", str(grid)]
    assert main([*argv, *CALL_ARGS]) == 0  # policy none: the uncached row only
    assert "uncached: " in capsys.readouterr().out
    assert Image.open(grid).size == ((2 * 17 + 1) * 4, (17 + 1) * 4)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("no/such/folder", "no such folder"),
        ("just-a-name", "no such folder"),
        ("tests.test_pipeline_e2e:no_factory", "has no attribute 'no_factory'"),
        ("no_such_module_xyz:factory", "no module named 'no_such_module_xyz'"),
        ("tests/no_such_file.py:factory", "not found"),
        ("tests.test_cli_user_pipeline:CALL_ARGS", "not callable"),
        ("tests.test_cli_user_pipeline:not_a_pipeline", "returned dict, not a pipeline"),
        ("tests.test_pipeline_e2e:_word_tokenizer", "missing 1 required"),  # a factory must take no arguments
        ("ditcache.testing:TINY_MODELS", "not callable"),
    ],
)
def test_bad_specs_are_clear_errors(spec, why, monkeypatch):
    monkeypatch.chdir(TESTS.parent)
    error = TypeError if "missing" in why else ValueError
    with pytest.raises(error, match=why) as info:
        load_pipeline(spec)
    if error is ValueError:
        assert "--pipeline" in str(info.value) and "save_pretrained" in str(info.value)
        assert "module.path:factory" in str(info.value) and "path/to/file.py:factory" in str(info.value)


def test_cli_refuses_bad_input_clearly(saved, tmp_path, capsys):
    folder, prompts = saved
    (tmp_path / "pipe").mkdir()  # a folder, but not saved with save_pretrained
    assert main(["generate", "--pipeline", str(tmp_path / "pipe"), "--prompts", prompts]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["calibrate", "mixcache", "--pipeline", folder]) == 2
    assert "--pipeline needs --prompts FILE" in capsys.readouterr().err
    assert main(["generate", "--prompts", prompts]) == 2
    assert "--prompts needs --pipeline" in capsys.readouterr().err
    assert main(["calibrate", "mixcache", "--pipeline", folder, "--prompts", prompts, "--out", "x.json"]) == 2
    assert "user profile directory" in capsys.readouterr().err
    assert main(["bench", "--pipeline", folder, "--prompts", prompts, "--call", "num_inference_steps=3"]) == 2
    assert "set by the command itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --model and --pipeline are mutually exclusive
        main(["generate", "--model", "ref-image", "--pipeline", folder])
    assert "not allowed with argument" in capsys.readouterr().err


def test_prompts_file_and_call_arguments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  # comment\n\na cat # not a comment here\n   a dog  \n")
    assert read_prompts(path) == ["a cat # not a comment here", "a dog"]
    path.write_text("# only comments\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(ValueError, match="file not found"):
        read_prompts(tmp_path / "missing.txt")
    items = ["negative_prompt=blurry", "true_cfg_scale=3.0", "height=16", "x=None", "t=(1, 2)", "s='a b'", "u=a=b"]
    assert pipeline_kwargs(items) == dict(
        negative_prompt="blurry", true_cfg_scale=3.0, height=16, x=None, t=(1, 2), s="a b", u="a=b"
    )
    for bad, why in (["novalue"], "key=value"), (["1x=2"], "key=value"), (["a=1", "a=2"], "twice"):
        with pytest.raises(ValueError, match=why):
            pipeline_kwargs(bad)
