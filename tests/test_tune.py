"""`ditcache.tune` and the `auto` preset: the best config for this model at a requested speedup, found again by
`ditcache.apply(model, "auto:speedup=...")`; hand-written loops on tiny models, and a real diffusers pipeline
through the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import ditcache
from ditcache.calibration.profiles import Profile, ProfileMismatchError, model_fingerprint
from ditcache.calibration.tune import GRID, TuneError, default_candidates, latent_psnr, spec_of, stored_config
from ditcache.engine.engine import ENGINE_ATTR
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

STEPS = 8
CANDIDATES = ["fora-2", "fora-3", "static-2", "teacache-0.1:threshold=0.4", "omnicache-traj-slow"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loop(model, family):
    """run(handle, num_steps=...): CFG Euler on a batch of 2; the num_steps keyword enables the fewer-steps baseline."""
    inputs = tiny_inputs(family, batch=2)
    uncond = tiny_uncond_inputs(family, inputs)

    def run(handle, num_steps=STEPS):
        return euler_sample(model, family, inputs, num_steps, uncond, guidance=3.0, handle=handle)

    return run


def _measure(model, run, config):
    handle = ditcache.apply(model, config)
    try:
        with handle.generation(num_steps=STEPS):
            out = run(handle)
        return out, handle.config, handle.stats().last
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_tune_picks_a_winner_that_apply_auto_finds(family, tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model = tiny_model(family, seed=3)
    run = _loop(model, family)
    result = ditcache.tune(model, speedup=1.5, num_steps=STEPS, run=run, guidance=3.0, candidates=CANDIDATES)

    assert [c.spec for c in result.candidates] == CANDIDATES
    assert all(c.error is None and c.fewer_steps is not None for c in result.candidates), result.table()
    table = result.table()
    assert all(f"| {spec} |" in table for spec in CANDIDATES) and "**winner**" in table
    winner = result.winner
    assert winner.macs_speedup >= 1.5 and winner.psnr == max(c.psnr for c in result.reaching())
    fora3 = next(c for c in result.candidates if c.spec == "fora-3")
    assert fora3.fewer_steps == round(STEPS / fora3.macs_speedup)
    assert fora3.margin == pytest.approx(fora3.psnr - fora3.fewer_steps_psnr)
    # OmniCache needs a profile: calibrated on the same generation and saved next to the tuned one.
    assert len(list(tmp_path.glob(f"omnicache-trajectory-*-{STEPS}.json"))) == 1

    saved = Profile.load(result.saved_to)
    assert result.saved_to.parent == tmp_path and result.saved_to.name.endswith(f"-{STEPS}-x1.5.json")
    assert (saved.method, saved.fingerprint, saved.num_steps) == ("auto", model_fingerprint(model), STEPS)
    assert saved.data["speedup"] == 1.5 and saved.data["spec"] == result.spec
    assert [row["spec"] for row in saved.data["candidates"]] == CANDIDATES
    assert ditcache.config_from_dict(saved.data["config"]) == result.config

    # apply(model, "auto:speedup=1.5") applies the winner, and it reaches the speedup when measured again.
    reference = run(None)
    out, config, stats = _measure(model, run, "auto:speedup=1.5")
    assert config == result.config
    assert stats.macs_speedup >= 1.5 and stats.macs_speedup == pytest.approx(winner.macs_speedup)
    assert latent_psnr(out, reference) == pytest.approx(winner.psnr, abs=1e-6)
    assert _measure(model, run, ditcache.AutoConfig(speedup=1.5, num_steps=STEPS))[1] == result.config

    # Another speedup is another file; each is found by its own speedup.
    faster = ditcache.tune(model, speedup=1.9, num_steps=STEPS, run=run, candidates=["fora-2", "fora-3"])
    assert faster.saved_to != result.saved_to and faster.spec == "fora-3"
    assert _measure(model, run, "auto:speedup=1.9")[1] == ditcache.preset("fora-3")
    assert _measure(model, run, "auto:speedup=1.5")[1] == result.config


def test_auto_without_a_tuned_profile_names_the_tune_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model = tiny_model("wan", seed=3)
    with pytest.raises(ProfileMismatchError, match=r"ditcache\.tune\(pipe, speedup=3, num_steps=N") as error:
        ditcache.apply(model, "auto:speedup=3")
    assert "ditcache tune --pipeline" in str(error.value) and "--speedup 3" in str(error.value)
    assert f"{tmp_path} (none)" in str(error.value)
    with pytest.raises(ProfileMismatchError, match="at 12 steps.*num_steps=12"):
        ditcache.apply(model, "auto:speedup=3:num_steps=12")
    assert getattr(model, ENGINE_ATTR, None) is None  # nothing left installed
    with pytest.raises(ValueError, match="speedup must be"):
        ditcache.AutoConfig(speedup=1.0)
    with pytest.raises(ValueError, match="num_steps must be"):
        ditcache.AutoConfig(num_steps=1)


def test_several_tuned_step_counts_need_the_step_count_when_their_winners_differ(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model = tiny_model("flux", seed=3)
    fingerprint = model_fingerprint(model)

    def save(steps, spec, speedup=2.0):
        data = {"speedup": speedup, "config": ditcache.parse_policy(spec).to_dict(), "spec": spec, "candidates": []}
        path = tmp_path / f"auto-mine-{fingerprint}-{steps}-x{speedup:g}.json"
        Profile("auto", "mine", fingerprint, steps, data).save(path)

    save(6, "fora-3")
    save(8, "fora-3")
    assert ditcache.AutoConfig().resolve(model) == ditcache.preset("fora-3")  # same winner: no ambiguity
    save(8, "teacache-0.2")
    with pytest.raises(ValueError, match=r"6 steps: fora-3; 8 steps: teacache-0.2.*'auto:speedup=2:num_steps=6'"):
        ditcache.AutoConfig().resolve(model)
    assert ditcache.AutoConfig(num_steps=8).resolve(model) == ditcache.preset("teacache-0.2")
    assert ditcache.AutoConfig(num_steps=6).resolve(model) == ditcache.preset("fora-3")
    save(6, "static-2", speedup=1.5)
    assert ditcache.AutoConfig(speedup=1.5).resolve(model) == ditcache.preset("static-2")
    with pytest.raises(ProfileMismatchError, match=r"mine@6x1.5, mine@6x2, mine@8x2"):
        ditcache.AutoConfig(speedup=3).resolve(model)


def test_no_candidate_reaching_the_speedup_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    model = tiny_model("wan", seed=3)
    run = _loop(model, "wan")
    fastest = r"no candidate reaches a MACs speedup of 6x.*the fastest is fora-3 at 1\."
    with pytest.raises(TuneError, match=fastest) as error:
        ditcache.tune(model, speedup=6, num_steps=STEPS, run=run, candidates=["fora-2", "fora-3"])
    assert len(error.value.result.candidates) == 2 and error.value.result.winner is None
    assert not list(tmp_path.glob("auto-*.json"))
    with pytest.raises(ValueError, match="needs run="):
        ditcache.tune(model, speedup=2, num_steps=STEPS)
    with pytest.raises(ValueError, match="speedup must be a number > 1"):
        ditcache.tune(model, speedup=0.5, num_steps=STEPS, run=run)
    with pytest.raises(ValueError, match="'auto' cannot be a candidate"):
        ditcache.tune(model, speedup=2, num_steps=STEPS, run=run, candidates=["auto"])
    with pytest.raises(ValueError, match="ran .* steps"):  # the loop runs 4 steps, not 8
        ditcache.tune(model, speedup=2, num_steps=STEPS, run=lambda handle: run(handle, num_steps=4))


def test_default_candidates_cover_every_preset_and_the_grid():
    names = default_candidates()
    assert set(names) >= set(ditcache.presets()) - {"auto"} and "auto" not in names
    assert names[-len(GRID) :] == list(GRID)
    for spec in GRID:
        config = ditcache.parse_policy(spec)
        assert ditcache.parse_policy(spec_of(config)) == config
    assert spec_of(ditcache.StaticIntervalConfig(interval=5, warmup_steps=2, reuse="blocks")) == "fora-2:interval=5"
    assert spec_of(ditcache.preset("teacache-0.2")) == "teacache-0.2"


@pytest.mark.parametrize("name", list(ditcache.presets()))
def test_config_from_dict_round_trips_every_preset(name):
    config = ditcache.preset(name)
    assert ditcache.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ditcache.config_from_dict(json.loads(json.dumps(stored_config(config)))) == config  # defaults left out
    for field in dataclasses.fields(config):  # tuple fields come back as tuples from JSON lists
        if "tuple" in str(field.type):
            changed = config.replace(**{field.name: _some_tuple(config, field.name)})
            back = ditcache.config_from_dict(json.loads(json.dumps(changed.to_dict())))
            assert back == changed and isinstance(getattr(back, field.name), tuple)


def _some_tuple(config, name):
    value = getattr(config, name)
    return value if value else {"downsample": (1, 2, 2), "reuse_steps": (2, 3), "rescale": (1.0, 0.0)}.get(name, ())


def test_config_from_dict_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="unknown config class 'Nope'.*StaticIntervalConfig"):
        ditcache.config_from_dict({"policy": "Nope"})
    with pytest.raises(ValueError, match="StaticIntervalConfig has no field"):
        ditcache.config_from_dict({"policy": "StaticIntervalConfig", "speed": 2})
    with pytest.raises(ValueError, match="interval must be"):
        ditcache.config_from_dict({"policy": "StaticIntervalConfig", "interval": 0})
    with pytest.raises(ValueError, match="'policy' key"):
        ditcache.config_from_dict({"interval": 2})
    assert ditcache.config_from_dict({"policy": "StaticIntervalConfig"}) == ditcache.StaticIntervalConfig()
    assert ditcache.config_from_dict({"policy": "ReuseScheduleConfig", "reuse_steps": [2, 4]}).reuse_steps == (2, 4)


def test_latent_psnr():
    x = torch.linspace(-1, 1, 32).reshape(2, 16)
    assert latent_psnr(x, x) == math.inf
    assert latent_psnr(x + 0.02, x) == pytest.approx(40.0, rel=1e-6)  # peak: the reference's range, 2


def test_cli_tune_on_a_pipeline_then_apply_auto(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ditcache.userpipe")
    from ditcache.cli import main
    from ditcache.userpipe import generate, load_pipeline

    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path / "profiles"))
    factory = "tests.test_pipeline_e2e:tiny_flux_pipeline"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\n")
    call = dict(negative_prompt="blurry", true_cfg_scale=3.0, height=16, width=16, max_sequence_length=16)
    call_args = [a for k, v in call.items() for a in ("--call", f"{k}={v}")]
    argv = ["tune", "--pipeline", factory, "--prompts", str(prompts), "--steps", "8", "--speedup", "1.5"]
    assert main([*argv, "--candidates", "fora-2,fora-3,static-2", *call_args]) == 0
    out = capsys.readouterr().out
    saved = list((tmp_path / "profiles").glob("auto-*-8-x1.5.json"))
    assert len(saved) == 1 and f"saved {saved[0]}" in out and "**winner**" in out
    assert all(f"| {spec} |" in out for spec in ("fora-2", "fora-3", "static-2")) and " steps: " in out  # fewer steps
    assert "auto:speedup=1.5" in out

    pipe = load_pipeline(factory)
    handle = ditcache.apply(pipe, "auto:speedup=1.5")
    images = generate(pipe, ["a photo of a cat", "a red dog"], 8, 0, call)
    stats = handle.stats().last
    handle.remove()
    assert handle.config == ditcache.config_from_dict(Profile.load(saved[0]).data["config"])
    assert torch.isfinite(images).all() and stats.macs_speedup >= 1.5

    assert main([*argv[:-1], "9", "--candidates", "fora-2", *call_args]) == 2
    captured = capsys.readouterr()
    assert "the fastest is fora-2" in captured.err and "| fora-2 |" in captured.out


def test_shipped_auto_profiles_and_cli_tune_on_a_reference_model(tmp_path, monkeypatch, capsys):
    from ditcache.calibration.profiles import PROFILE_DIR
    from ditcache.cli import main
    from ditcache.refmodels import RefPipeline

    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path / "profiles"))
    pipe = RefPipeline.from_pretrained("ref-image")
    shipped = Profile.load(PROFILE_DIR / "auto-ref-image-50-x2.json")
    assert shipped.fingerprint == model_fingerprint(pipe.transformer) and shipped.data["macs_speedup"] >= 2
    handle = ditcache.apply(pipe, "auto:speedup=2")
    handle.remove()
    winner = ditcache.config_from_dict(shipped.data["config"])
    assert handle.config == winner == ditcache.parse_policy(shipped.data["spec"])

    out = tmp_path / "auto-ref-image-4-x1.2.json"
    argv = ["tune", "--model", "ref-image", "--steps", "4", "--samples", "1", "--speedup", "1.2", "--out", str(out)]
    assert main([*argv, "--candidates", "fora-2,static-2"]) == 0
    printed = capsys.readouterr().out
    profile = Profile.load(out)
    assert profile.model_name == "ref-image" and profile.data["spec"] in ("fora-2", "static-2")
    assert f"saved {out}" in printed and "| fora-2 |" in printed and "| static-2 |" in printed
    assert "--policy auto:speedup=1.2" in printed
