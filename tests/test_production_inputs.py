"""Bad input a production user hands ditcache (issue 18, part B): malformed or tampered profiles, numpy config
values, duplicate preset overrides, bfloat16 / float16 models, and the cache dtype / device options."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ditcache
from ditcache.calibration.profiles import PROFILE_DIR, PROFILE_DIR_ENV, Profile
from ditcache.calibration.validate import InvalidProfileError
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs, write_tiny_profiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6


# ------------------------------------------------------------------------------------------------ profiles
def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(path: tuple) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def _shorten(path: tuple) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        target = raw
        for key in path:
            target = target[key]
        target.pop()

    return change


def _one_block_less(raw: dict) -> None:
    """A layered profile that is consistent in itself but made for a model with one block less."""
    data = raw["data"]
    for key in ("loss", "block_macs", "parents", "blocks"):
        if key in data:
            data[key].pop()


NAN, INF = float("nan"), float("inf")
# (shipped profile, corruption, the field the error must name)
CORRUPTIONS = {
    "mixcache-theta-string": ("mixcache-ref-image-50", _set(("data", "theta"), "0.1"), "data.theta"),
    "mixcache-theta-nan": ("mixcache-ref-image-50", _set(("data", "theta"), NAN), "data.theta"),
    "mixcache-delta1-negative": ("mixcache-ref-image-50", _set(("data", "delta1"), -1.0), "data.delta1"),
    "mixcache-impact-missing": ("mixcache-ref-image-50", _drop(("data", "impact_cfg")), "data.impact_cfg"),
    "mixcache-impact-short": ("mixcache-ref-image-50", _shorten(("data", "impact_block", "1")), "data.impact_block.1"),
    "mixcache-impact-list": ("mixcache-ref-video-50", _set(("data", "impact_block"), []), "data.impact_block"),
    "mixcache-impact-key": ("mixcache-ref-image-50", _set(("data", "impact_block", "x"), [0.1] * 50), "impact_block.x"),
    "trajectory-gamma-nan": ("omnicache-trajectory-ref-image-50", _set(("data", "gamma", 3), NAN), "data.gamma[3]"),
    "trajectory-gamma-short": ("omnicache-trajectory-ref-video-50", _shorten(("data", "gamma")), "data.gamma"),
    "trajectory-step-range": (
        "omnicache-trajectory-ref-image-50",
        _set(("data", "schedules", "slow", 0), 50),
        "data.schedules.slow[0]",
    ),
    "trajectory-step-string": (
        "omnicache-trajectory-ref-image-50",
        _set(("data", "schedules", "fast", 1), "3"),
        "data.schedules.fast[1]",
    ),
    "trajectory-no-fast": ("omnicache-trajectory-ref-image-50", _drop(("data", "schedules", "fast")), "schedules.fast"),
    "layered-loss-short": ("omnicache-layered-ref-image-50", _shorten(("data", "loss", 2)), "data.loss.2"),
    "layered-macs-negative": ("omnicache-layered-ref-image-50", _set(("data", "block_macs", 0), -5), "block_macs[0]"),
    "layered-forward-zero": ("omnicache-layered-ref-latte-50", _set(("data", "forward_macs"), 0), "forward_macs"),
    "layered-parent-range": ("omnicache-layered-ref-video-50", _set(("data", "parents", 1), [7]), "parents.1[0]"),
    "precisecache-negative": ("precisecache-ref-image-50", _set(("data", "values", 5), -3.0), "data.values[5]"),
    "precisecache-values-null": ("precisecache-ref-video-50", _set(("data", "values"), None), "data.values"),
    "precisecache-lag-short": ("precisecache-ref-image-50", _shorten(("data", "by_lag", "2")), "data.by_lag.2"),
    "teacache-inf": ("teacache-ref-image-50", _set(("data", "values", 7), INF), "data.values[7]"),
    "tokencache-blocks-string": ("tokencache-ref-image-50", _set(("data", "num_blocks"), "6"), "data.num_blocks"),
    "tokencache-cacheable-range": ("tokencache-ref-image-50", _set(("data", "cacheable"), [0, 9]), "cacheable[1]"),
    "tokencache-weights-path": (
        "tokencache-ref-video-50",
        _set(("data", "weights"), "../../outside.safetensors"),
        "data.weights",
    ),
    "tokencache-scores-inf": ("tokencache-ref-dit-50", _set(("data", "mean_scores", 2), INF), "mean_scores[2]"),
    "auto-unknown-config": ("auto-ref-image-50-x2", _set(("data", "config"), {"policy": "NoSuchConfig"}), "config"),
    "auto-bad-config": (
        "auto-ref-video-50-x2",
        _set(("data", "config"), {"policy": "PreciseCacheConfig", "alpha": -1}),
        "data.config",
    ),
    "auto-speedup-bool": ("auto-ref-image-50-x2", _set(("data", "speedup"), True), "data.speedup"),
    "header-steps-string": ("mixcache-ref-image-50", _set(("num_steps",), "50"), "num_steps"),
    "header-no-fingerprint": ("teacache-ref-video-50", _drop(("fingerprint",)), "fingerprint"),
    "header-data-list": ("omnicache-trajectory-ref-image-50", _set(("data",), []), "data"),
}


def _write_corrupted(tmp_path: Path, name: str, change: Callable[[dict], None]) -> Path:
    raw = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    change(raw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))  # NaN / Infinity written as JSON's non-standard literals, as json does
    return path


def test_every_shipped_profile_is_valid():
    for path in sorted(PROFILE_DIR.glob("*.json")):
        Profile.load(path)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_profile_is_refused_on_load_naming_the_file_and_field(case, tmp_path):
    name, change, field = CORRUPTIONS[case]
    path = _write_corrupted(tmp_path, name, change)
    with pytest.raises(InvalidProfileError) as error:
        Profile.load(path)
    assert str(path) in str(error.value) and field in error.value.field, str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("text", ("", "{", '{"method": "mixcache", "data": {', "[1, 2]", "null"))
def test_truncated_or_non_object_json_is_refused(text, tmp_path):
    path = tmp_path / "mixcache-broken.json"
    path.write_text(text)
    with pytest.raises(InvalidProfileError, match="mixcache-broken.json"):
        Profile.load(path)


def test_a_truncated_shipped_profile_is_refused(tmp_path):
    text = (PROFILE_DIR / "mixcache-ref-image-50.json").read_text()
    path = tmp_path / "mixcache-ref-image-50.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(InvalidProfileError, match="not valid JSON"):
        Profile.load(path)


def test_a_given_profile_path_is_checked_when_applied(tmp_path):
    """`profile=` in the config: the file is read when `apply` builds the policy, before any forward."""
    path = _write_corrupted(tmp_path, "omnicache-trajectory-ref-image-50", _set(("data", "gamma", 0), NAN))
    model = tiny_model("flux")
    with pytest.raises(InvalidProfileError, match="gamma"):
        ditcache.apply(model, ditcache.OmniCacheTrajectoryConfig(profile=str(path)))
    assert not hasattr(model, "_ditcache_engine") or model._ditcache_engine is None


def _tiny_profile(tmp_path: Path, method: str, model: torch.nn.Module) -> Path:
    directory = tmp_path / "profiles"
    (path,) = write_tiny_profiles(directory, model, (STEPS,), methods=(method,))
    return path


def _generation_raises(model: torch.nn.Module, preset: str, match: str) -> None:
    """The error comes at the first forward (where the step count is first known), before anything ran."""
    handle = ditcache.apply(model, preset)
    inputs = tiny_inputs("flux")
    with pytest.raises(InvalidProfileError, match=match), torch.no_grad(), handle.generation(num_steps=STEPS):
        euler_sample(model, "flux", inputs, STEPS, tiny_uncond_inputs("flux", inputs), handle=handle)
    assert handle.records() == []
    handle.remove()


@pytest.mark.parametrize(
    ("method", "preset", "change", "field"),
    [
        ("mixcache", "mixcache-acc", _set(("data", "impact_block", "40"), [0.5] * STEPS), "impact_block.40"),
        ("omnicache-layered", "omnicache-layered-2x", _one_block_less, "data.loss"),
        ("omnicache-trajectory", "omnicache-traj-slow", _set(("data", "gamma", 2), NAN), "gamma[2]"),
        ("mixcache", "mixcache-eff", _set(("data", "theta"), -1.0), "theta"),
    ],
)
def test_a_tampered_profile_of_this_model_raises_before_the_first_step(method, preset, change, field, tmp_path):
    """A profile found by lookup that matches the model and the step count but is tampered with (data that does
    not fit the model's blocks or the schema) raises instead of being used or silently skipped."""
    model = tiny_model("flux")
    path = _tiny_profile(tmp_path, method, model)
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROFILE_DIR_ENV, str(path.parent))
        _generation_raises(model, preset, field.replace("[", r"\[").replace("]", r"\]"))


@pytest.fixture(scope="module")
def tokencache_profile(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokencache")
    model = tiny_model("flux")
    (path,) = write_tiny_profiles(directory, model, (STEPS,), methods=("tokencache",))
    return path


@pytest.mark.parametrize("damage", ("transpose", "nan", "drop"))
def test_tokencache_weights_with_wrong_shapes_or_values_are_refused(damage, tokencache_profile, tmp_path):
    """A safetensors file that does not fit the model's predictor / LoRA (or holds NaN): one error naming the
    weights file and the tensor, never a size-mismatch RuntimeError or NaN scores mid-generation."""
    import hashlib

    raw = json.loads(tokencache_profile.read_text())
    tensors = load_file(str(tokencache_profile.with_suffix(".safetensors")))
    key = next(
        k for k, v in sorted(tensors.items()) if k.startswith("predictor.") and v.ndim == 2 and v.shape[0] != v.shape[1]
    )
    if damage == "transpose":
        tensors[key] = tensors[key].t().contiguous()
    elif damage == "nan":
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    else:
        del tensors[key]
    weights = tmp_path / raw["data"]["weights"]
    save_file(tensors, str(weights))
    raw["data"]["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    path = tmp_path / tokencache_profile.name
    path.write_text(json.dumps(raw))
    model = tiny_model("flux")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROFILE_DIR_ENV, str(tmp_path))
        _generation_raises(model, "tokencache-fast", key[len("predictor.") :].replace(".", r"\."))


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize(
    ("value", "expected"),
    [(np.float32(0.7), 0.7), (np.float64(0.7), 0.7), (np.float16(0.5), 0.5), (torch.tensor(0.7), 0.7)],
)
def test_numpy_and_0d_floats_are_accepted_as_python_floats(value, expected):
    config = ditcache.PreciseCacheConfig(alpha=value)
    assert type(config.alpha) is float and math.isclose(config.alpha, expected, rel_tol=1e-6)
    assert config == ditcache.PreciseCacheConfig(alpha=expected)


@pytest.mark.parametrize("value", (np.int64(3), np.int32(3), np.array(3), torch.tensor(3), np.uint8(3)))
def test_numpy_and_0d_integers_are_accepted_as_python_ints(value):
    config = ditcache.StaticIntervalConfig(interval=value)
    assert type(config.interval) is int and config.interval == 3
    assert ditcache.PreciseCacheConfig(downsample=(value, np.int64(2), 2)).downsample == (3, 2, 2)


@pytest.mark.parametrize(
    "value", (np.bool_(True), torch.tensor(True), np.float64("nan"), np.float32("inf"), np.array([3]), np.float32(2.5))
)
def test_numpy_bools_non_finite_and_non_scalars_are_still_rejected(value):
    with pytest.raises(ValueError, match="interval"):
        ditcache.StaticIntervalConfig(interval=value)


def test_a_duplicate_override_key_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="'warmup_steps' is given twice"):
        ditcache.parse_policy("teacache-0.1:warmup_steps=2:warmup_steps=3")
    assert ditcache.parse_policy("teacache-0.1:warmup_steps=2").warmup_steps == 2


def test_mixcache_never_chooses_a_granularity_whose_redundancy_is_nan():
    """A NaN D (0 / 0 on an all-zero output, or NaN that reached a measurement) must not win the P = D x I
    minimum: min() with a NaN first keeps it, which made MixCache reuse at step granularity on NaN."""
    from ditcache.policies.mixcache_controller import CFG, STEP, Granularity, MixCacheController, MixCacheProfileData

    profile = MixCacheProfileData(1.0, 1.0, 1.0, impact_step=0.01, impact_cfg=1.0, impact_block={})
    controller = MixCacheController(profile, (4, 3, 2), frozenset({Granularity.STEP, Granularity.CFG}), penalty=False)
    controller.d = {STEP: float("nan"), CFG: 0.1}
    assert controller.choose(3) == CFG
    controller.d = {STEP: float("nan")}
    assert controller.choose(3) is None  # nothing known: compute


# ------------------------------------------------------------------------------------------------ dtypes
def _profiles_for(directory: Path, dtype: torch.dtype) -> None:
    """Tiny profiles measured on the float32 model, re-tagged for its `dtype` copy (its weights fingerprint
    differs): the tiny calibrations feed float32 inputs, and the statistics' scale is what matters."""
    from ditcache.calibration.profiles import model_fingerprint

    made = directory / "float32"
    write_tiny_profiles(made, tiny_model("flux"), (STEPS,))
    fingerprint = model_fingerprint(tiny_model("flux").to(dtype))
    for path in made.iterdir():
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
            raw["fingerprint"] = fingerprint
            (directory / path.name).write_text(json.dumps(raw))
        else:
            path.rename(directory / path.name)


@pytest.fixture(scope="module")
def half_profiles(tmp_path_factory):
    dirs = {}
    for dtype in (torch.bfloat16, torch.float16):
        dirs[dtype] = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        _profiles_for(dirs[dtype], dtype)
    dirs[torch.float32] = tmp_path_factory.mktemp("float32")
    write_tiny_profiles(dirs[torch.float32], tiny_model("flux"), (STEPS,))
    return dirs


def _generate(config, dtype: torch.dtype = torch.float32):
    model = tiny_model("flux").to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_inputs("flux").items()}
    handle = ditcache.apply(model, config)
    with torch.no_grad(), handle.generation(num_steps=STEPS):
        output = euler_sample(model, "flux", inputs, STEPS, tiny_uncond_inputs("flux", inputs), handle=handle)
    stats = handle.stats()
    handle.remove()
    return output, stats


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("preset", tuple(ditcache.presets()))
def test_every_preset_runs_a_half_precision_model(preset, dtype, half_profiles, monkeypatch):
    """bfloat16 / float16 models on every method (PreciseCache's avg_pool3d has no CPU bfloat16 kernel: its
    statistic is computed in float32): finite output in the model's dtype, and it reuses where float32 does."""
    monkeypatch.setenv(PROFILE_DIR_ENV, str(half_profiles[torch.float32]))
    _, full = _generate(preset)
    monkeypatch.setenv(PROFILE_DIR_ENV, str(half_profiles[dtype]))
    output, half = _generate(preset, dtype)
    assert output.dtype == dtype and torch.isfinite(output).all()
    assert (half.last.macs_executed < half.last.macs_full) == (full.last.macs_executed < full.last.macs_full)


# ------------------------------------------------------------------------------------------------ cache memory
def _kept_tensors(handle) -> list[torch.Tensor]:
    from ditcache.engine.calls import iter_tensors

    def kept(value) -> list[torch.Tensor]:  # nested states too (FORA's block segments)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return [t for field in vars(value).values() for t in kept(field)]
        return iter_tensors(value)

    return kept(handle.branch_state("cond"))


@pytest.mark.parametrize("preset", ("fora-3", "static-2", "mixcache-acc", "omnicache-traj-slow", "precisecache-flash"))
def test_cache_dtype_bfloat16_halves_the_cache_bytes(preset, half_profiles, monkeypatch):
    """Every stored tensor is kept in bfloat16 on the cache device and comes back in float32 where used; the
    cache bytes stats report are halved, and the output stays close to the full-precision cache's."""
    monkeypatch.setenv(PROFILE_DIR_ENV, str(half_profiles[torch.float32]))
    config = ditcache.parse_policy(preset)
    full_output, full = _generate(config)
    output, half = _generate(config.replace(cache_dtype="bfloat16", cache_device="cpu"))
    assert full.cache_bytes > 0 and half.cache_bytes * 2 == full.cache_bytes
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
    assert (output - full_output).abs().max() < 0.05 * full_output.abs().max()
    same, _ = _generate(config.replace(cache_dtype="float32"))  # the model's own dtype: nothing changes
    assert torch.equal(same, full_output)


def test_stored_tensors_are_kept_in_the_cache_dtype(half_profiles, monkeypatch):
    model = tiny_model("flux")
    handle = ditcache.apply(model, ditcache.preset("fora-2").replace(cache_dtype=torch.bfloat16))
    inputs = tiny_inputs("flux")
    with torch.no_grad(), handle.generation(num_steps=STEPS):
        euler_sample(model, "flux", inputs, STEPS, tiny_uncond_inputs("flux", inputs), handle=handle)
        kept = _kept_tensors(handle)
    handle.remove()
    assert kept and {t.dtype for t in kept} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"cache_dtype": "int8"}, "cache_dtype"),
        ({"cache_device": "moon"}, "cache_device"),
        ({"cache_device": 3}, "cache_device"),
    ],
)
def test_bad_cache_options_are_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        ditcache.preset("fora-2").replace(**changes)


def test_cache_options_are_keyword_only_and_left_out_of_dicts_while_unset(half_profiles, monkeypatch):
    assert ditcache.StaticIntervalConfig(3).interval == 3
    assert "cache_dtype" not in ditcache.preset("fora-2").to_dict()
    config = ditcache.preset("fora-2").replace(cache_dtype=torch.bfloat16, cache_device=torch.device("cpu"))
    assert (config.cache_dtype, config.cache_device) == ("bfloat16", "cpu")
    assert ditcache.config_from_dict(config.to_dict()) == config
    monkeypatch.setenv(PROFILE_DIR_ENV, str(half_profiles[torch.float32]))
    resolved = ditcache.AutoConfig(cache_dtype="bfloat16").resolve(tiny_model("flux"))
    assert resolved == ditcache.preset("fora-2").replace(cache_dtype="bfloat16")
