"""OmniCache (trajectory): geometry, schedules, filters, profiles, and sampling with correction."""

import json
import random

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import ditcache
from ditcache.calibration.omnicache import OmniCacheCalibrationConfig, build_profile
from ditcache.calibration.profiles import Profile, ProfileMismatchError
from ditcache.calibration.trajectory import curvature, has_three_consecutive, project_3d, select_reuse_steps
from ditcache.numerics import frequency_split
from ditcache.policies import mixcache, omnicache_trajectory
from ditcache.testing import tiny_inputs, tiny_model


def test_curvature_of_known_geometry():
    line = np.stack([np.linspace(0, 1, 10), np.zeros(10), np.zeros(10)], axis=1)
    assert np.allclose(curvature(line)[1:-1], 0.0)
    radius = 2.5
    angles = np.linspace(0, np.pi, 20)
    circle = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.zeros(20)], axis=1)
    assert np.allclose(curvature(circle)[1:-1], 1 / radius)
    assert np.isinf(curvature(circle)[[0, -1]]).all()


def test_projection_keeps_a_planar_trajectory_exactly():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(50, 3)))[0].T  # 3 orthonormal directions in 50-D
    t = np.linspace(0, 1, 12)
    coords = np.stack([t, 0.3 * np.sin(3 * t), 0.1 * t**2], axis=1)
    trajectory = coords @ basis
    projected = project_3d(trajectory)
    # Distances between points are preserved when the trajectory lives in a 3-D subspace.
    d_true = np.linalg.norm(trajectory[:, None] - trajectory[None], axis=-1)
    d_proj = np.linalg.norm(projected[:, None] - projected[None], axis=-1)
    assert np.allclose(d_true, d_proj, atol=1e-9)


def test_no_three_consecutive_for_any_curvature():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(3, 60)
        values = np.array([rng.random() for _ in range(n)])
        fraction = rng.choice([0.0, 0.2, 0.5, 0.6, 0.66])
        chosen = select_reuse_steps(values, fraction, warmup=rng.randint(0, 3))
        assert not has_three_consecutive(chosen)
        assert len(chosen) <= round(fraction * n)
        assert all(values[s] <= max(values) for s in chosen)


def test_lowest_curvature_steps_are_chosen():
    values = np.array([np.inf, 5, 4, 0.1, 0.2, 0.3, 9, 0.05, 8, 7])
    # warm-up 2 excludes 0, 1; lowest: 7, 3, 4 then 5 would make 3-4-5 consecutive, so 9 (7.0) is next.
    assert select_reuse_steps(values, 0.4, warmup=2) == (3, 4, 7, 9)
    with pytest.raises(ValueError, match="fraction"):
        select_reuse_steps(values, 0.8)


def test_low_plus_high_pass_reconstructs():
    x = torch.randn(2, 3, 2, 8, 6)
    low, high = frequency_split(x, 0.25)
    torch.testing.assert_close(low + high, x)
    assert low.abs().sum() > 0 and high.abs().sum() > 0
    constant = torch.ones(1, 1, 1, 8, 8)
    low, high = frequency_split(constant, 0.01)
    torch.testing.assert_close(low, constant)


def _ddim_loop(model, inputs, scheduler, handle=None, record=None):
    """Epsilon-prediction sampling (DDIM) with a tiny model: the model output is used as epsilon."""
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
    if record is not None:
        record.append(x.clone())
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = model(hidden_states=x, timestep=t.expand(x.shape[0]).float(), return_dict=False, **cond)[0]
        x = scheduler.step(eps, t, x).prev_sample
        if record is not None:
            record.append(x.clone())
    return x


def _epsilon_profile(tmp_path, steps=10):
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", batch=2)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    handle = ditcache.apply(model, OmniCacheCalibrationConfig())
    trajectory = []
    with handle.generation(num_steps=steps):
        _ddim_loop(model, inputs, scheduler, record=trajectory)
    profile = build_profile(model, "tiny-wan", handle.policy.q, trajectory, steps)
    handle.remove()
    path = profile.save(tmp_path / "omnicache-trajectory-tiny.json")
    return model, inputs, scheduler, path


def test_epsilon_prediction_sampler_with_correction(tmp_path):
    model, inputs, scheduler, path = _epsilon_profile(tmp_path)
    profile = Profile.load(path)
    assert profile.data["schedules"]["slow"] and len(profile.data["gamma"]) == 10
    reference = _ddim_loop(model, inputs, scheduler)
    results = {}
    for correction in (False, True):
        handle = ditcache.apply(
            model, ditcache.OmniCacheTrajectoryConfig(profile=str(path), correction=correction, filtering=False)
        )
        with handle.generation(num_steps=10):
            out = _ddim_loop(model, inputs, scheduler)
        stats = handle.stats().last
        handle.remove()
        assert torch.isfinite(out).all() and not torch.equal(out, reference)
        assert stats.macs_speedup > 1.0
        results[correction] = (out, stats)
    # The correction changes only the reuse steps' outputs and costs one cheap pass before each.
    assert not torch.equal(results[True][0], results[False][0])
    assert results[True][1].macs_executed > results[False][1].macs_executed


def test_profile_for_other_steps_or_model_is_a_clear_error(tmp_path):
    model, inputs, scheduler, path = _epsilon_profile(tmp_path)
    handle = ditcache.apply(model, ditcache.OmniCacheTrajectoryConfig(profile=str(path)))
    scheduler.set_timesteps(8)
    with pytest.raises(ProfileMismatchError, match="calibrated for 10 steps"), handle.generation(num_steps=8):
        _ddim_loop(model, inputs, scheduler)
    handle.remove()
    other = tiny_model("wan", seed=3)
    handle = ditcache.apply(other, ditcache.OmniCacheTrajectoryConfig(profile=str(path)))
    scheduler.set_timesteps(10)
    with pytest.raises(ProfileMismatchError, match="another model"), handle.generation(num_steps=10):
        _ddim_loop(other, inputs, scheduler)
    handle.remove()
    data = json.loads(path.read_text())
    del data["fingerprint"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a ditcache profile"):
        Profile.load(path)


def test_unknown_model_has_no_shipped_profile():
    model = tiny_model("flux")
    handle = ditcache.apply(model, "omnicache-traj-slow")
    inputs = tiny_inputs("flux")
    with pytest.raises(ProfileMismatchError, match="calibrate omnicache-trajectory "), handle.generation(num_steps=5):
        model(timestep=torch.tensor([1.0]), **inputs)
    handle.remove()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"speed": "turbo"}, "speed"),
        ({"filter_switch": 2.0}, "filter_switch"),
        ({"filter_radius": 0.0}, "filter_radius"),
        ({"correction": 1}, "correction"),
    ],
)
def test_invalid_omnicache_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ditcache.OmniCacheTrajectoryConfig(**kwargs)


@pytest.mark.parametrize("name", ["ref-image", "ref-video"])
def test_shipped_profiles_match_the_shipped_models(name):
    from ditcache.calibration.profiles import find_profile
    from ditcache.refmodels import RefPipeline

    transformer = RefPipeline.from_pretrained(name).transformer
    for method in (omnicache_trajectory.METHOD, mixcache.METHOD):
        profile = find_profile(method, transformer, 50)
        assert (profile.method, profile.model_name) == (method, name)


def test_profile_globs_do_not_overlap():
    """`find_profile` globs `<method>-*.json`: no method's glob may pick up another method's files."""
    from ditcache.calibration.profiles import PROFILE_DIR, Profile

    methods = (omnicache_trajectory.METHOD, mixcache.METHOD)
    assert omnicache_trajectory.METHOD == "omnicache-trajectory"
    for method in methods:
        paths = sorted(PROFILE_DIR.glob(f"{method}-*.json"))
        assert len(paths) == 2
        assert {Profile.load(p).method for p in paths} == {method}
    assert not list(PROFILE_DIR.glob("omnicache-ref-*.json"))  # the old names are gone


def test_old_omnicache_names_are_gone():
    assert "omnicache-slow" not in ditcache.presets() and "omnicache-fast" not in ditcache.presets()
    assert {"omnicache-traj-slow", "omnicache-traj-fast"} <= set(ditcache.presets())
    assert not hasattr(ditcache, "OmniCacheConfig")


def test_cli_calibrate_old_method_name_names_the_new_one(capsys):
    from ditcache.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "omnicache"])
    assert "omnicache-trajectory" in capsys.readouterr().err
    assert build_parser().parse_args(["calibrate", "omnicache-trajectory"]).method == "omnicache-trajectory"


def test_fingerprint_is_stable_across_processes():
    import os
    import subprocess
    import sys

    code = (
        "from ditcache.testing import tiny_model; from ditcache.calibration.profiles import model_fingerprint;"
        "print(model_fingerprint(tiny_model('wan')))"
    )
    prints = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(prints) == 1
