"""TokenCache: predictor, training, hard top-k caching, MACs accounting, LoRA load / unload, profiles."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ditcache
from ditcache.calibration.profiles import ProfileMismatchError
from ditcache.calibration.record import CalibrationRun
from ditcache.calibration.tokencache import TrainOptions, tiny_profile, train_tokencache
from ditcache.calibration.tokencache_predictor import CachePredictor, clean_copy, load_tensors
from ditcache.config import PolicyConfig
from ditcache.engine.macs import _custom_mapping
from ditcache.policies.base import Policy
from ditcache.policies.tokencache import run_cached_block
from ditcache.registry import register_policy
from ditcache.testing import euler_sample, tiny_inputs, tiny_model, tiny_uncond_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6
TOKENS = {"flux": 64, "dit": 16}  # image tokens of the tiny models


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family)


@functools.cache
def _profile(family: str, steps: int = STEPS):
    return tiny_profile(_model(family), steps)


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    """The tiny profiles of flux and dit (trained once per session), saved where `apply` finds them."""
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    for family in ("flux", "dit"):
        _profile(family).save(tmp_path / f"tokencache-tiny-{family}-{STEPS}.json")
    return tmp_path


def _generate(family: str, handle=None, steps: int = STEPS, batch: int = 1) -> torch.Tensor:
    model = _model(family)
    inputs = tiny_inputs(family, batch=batch)
    uncond = tiny_uncond_inputs(family, inputs)
    if handle is None:
        return euler_sample(model, family, inputs, steps, uncond)
    with handle.generation(num_steps=steps):
        return euler_sample(model, family, inputs, steps, uncond, handle=handle)


def _run(family: str, spec: str, steps: int = STEPS, batch: int = 1):
    handle = ditcache.apply(_model(family), spec)
    try:
        out = _generate(family, handle, steps, batch)
        return out, handle.stats().last, handle.policy
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------- predictor
def test_predictor_shape_and_block0_initialisation():
    model = _model("dit")
    block = model.transformer_blocks[0]
    predictor = CachePredictor(block, 16, 3, ("hidden_states",), "hidden_states")
    for name, value in block.state_dict().items():
        assert torch.equal(predictor.block.state_dict()[name], value)  # starts from block 0's weights
    assert predictor.block is not block
    x = torch.randn(2, 16, 16)
    scores = predictor(hidden_states=x, timestep=torch.tensor([500.0, 400.0]), class_labels=torch.tensor([1, 2]))
    assert scores.shape == (2, 16, 3)  # (rows, tokens, one score per block)
    assert bool(((scores > 0) & (scores < 1)).all())  # sigmoid


def test_clean_copy_drops_engine_hooks():
    model = _model("dit")
    handle = ditcache.apply(model, "fora-2")
    try:
        copy = clean_copy(model.transformer_blocks[0])
    finally:
        handle.remove()
    assert "forward" not in vars(copy)


def test_training_lowers_the_loss_and_writes_safetensors(tmp_path):
    model, family = _model("dit"), "dit"
    inputs = tiny_inputs(family, batch=2)
    uncond = tiny_uncond_inputs(family, inputs)

    def run(handle):
        return euler_sample(model, family, inputs, STEPS, uncond, handle=handle)

    options = TrainOptions(iterations=40, lora_iterations=4, progress=False, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    profile = train_tokencache(model, CalibrationRun(run, STEPS, 3.0), "tiny-dit", options)
    loss = profile.data["loss"]["predictor"]
    assert loss["last"] < loss["first"]
    assert profile.data["iterations"] == [40, 4]
    assert len(profile.data["mean_scores"]) == STEPS and profile.data["i_steps"][0] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is frozen
    assert [p.requires_grad for p in model.parameters()] == flags  # frozen for training, then restored
    path = profile.save(tmp_path / "tokencache-tiny.json")
    data = json.loads(path.read_text())["data"]
    weights = tmp_path / data["weights"]
    assert weights.suffix == ".safetensors" and weights.exists()
    assert weights.read_bytes()[:8] != b"\x80\x02\x80\x03"[:8]  # not a pickle
    tensors = load_tensors(ditcache.calibration.profiles.Profile.load(path), path)
    assert any(k.startswith("lora.") for k in tensors) and any(k.startswith("predictor.head") for k in tensors)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="SHA-256"):
        load_tensors(ditcache.calibration.profiles.Profile.load(path), path)


# ------------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("family", ["flux", "dit"])
def test_ratio_zero_is_bit_exact(family, profile_dir):
    reference = _generate(family)
    out, stats, policy = _run(family, "tokencache:ratio=0")
    assert torch.equal(out, reference)
    assert stats.token_fraction == 1.0
    assert policy.trace and all(k == TOKENS[family] for _, _, counts in policy.trace for k in counts)  # P-steps ran
    assert stats.macs_executed > stats.macs_full  # ... and paid for the predictor


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_ratio_one_adds_cached_updates_only(family, profile_dir):
    out, stats, policy = _run(family, "tokencache:ratio=1")
    i_steps = policy.i_steps(STEPS)
    p_forwards = 2 * (STEPS - len(i_steps))
    assert p_forwards > 0 and len(policy.trace) == p_forwards
    assert all(k == 0 for _, _, counts in policy.trace for k in counts)
    num_blocks = stats.blocks_total
    cacheable = range(num_blocks - 1)  # K = 1
    for position in range(num_blocks):
        full = TOKENS[family] * 2 * (len(i_steps) if position in cacheable else STEPS)  # 2 branches
        assert stats.block_tokens[position] == full
    assert torch.isfinite(out).all()


def test_macs_match_executed_token_counts(profile_dir):
    """Random selection, uniform I-steps, K = 1, kept-token attention: every cached block runs k tokens per
    row at P-steps; executed MACs = the forwards' outside-block cost + full blocks + each block at k tokens."""
    family = "dit"
    spec = "tokencache:selection='random':schedule='uniform':refiners=1:lora=False:attention='kept':ratio=0.75"
    _, stats, policy = _run(family, spec)
    model = _model(family)
    i_steps = policy.i_steps(STEPS)
    p_steps = STEPS - len(i_steps)
    k = 4  # round(0.25 x 16)
    assert all(counts == [k, k] for _, _, counts in policy.trace)
    assert stats.block_tokens == [16 * 2 * len(i_steps) + k * 2 * p_steps] * 2 + [16 * 2 * STEPS]
    inputs = tiny_inputs(family)
    block = model.transformer_blocks[0]
    hidden = torch.randn(1, 16, 16)

    def macs(run) -> int:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            run()
        return counter.get_total_flops() // 2

    args = dict(timestep=torch.tensor([500.0]), class_labels=inputs["class_labels"])
    full_block, k_block = macs(lambda: block(hidden, **args)), macs(lambda: block(hidden[:, :k], **args))
    forward = macs(lambda: model(hidden_states=inputs["hidden_states"], **args))
    outside = forward - 3 * full_block
    expected = 2 * STEPS * outside + 2 * (len(i_steps) * 3 + p_steps) * full_block + 2 * p_steps * 2 * k_block
    assert stats.macs_full == 2 * STEPS * forward
    assert stats.macs_executed == expected


def test_learned_selection_counts_the_predictor(profile_dir):
    _, stats_random, _ = _run("dit", "tokencache:selection='random':ratio=0:attention='kept'")
    _, stats_learned, policy = _run("dit", "tokencache:ratio=0:attention='kept'")
    assert stats_random.macs_executed == stats_learned.macs_full  # ratio 0 without a predictor: the full cost
    predictor = policy._setups[STEPS].predictor
    inputs = tiny_inputs("dit")
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        predictor(
            hidden_states=torch.randn(1, 16, 16), timestep=torch.tensor([5.0]), class_labels=inputs["class_labels"]
        )
    p_forwards = len(policy.trace)
    assert stats_learned.macs_executed - stats_learned.macs_full == p_forwards * (counter.get_total_flops() // 2)


def test_batch_rows_choose_their_own_tokens(profile_dir):
    """Norm selection (the same count in every block): a row gives alone what it gives in a batch."""
    model = _model("dit")
    both = tiny_inputs("dit", batch=2)
    outputs = []
    for rows in (slice(0, 2), slice(0, 1)):
        inputs = {k: v[rows] for k, v in both.items()}
        handle = ditcache.apply(model, "tokencache:selection='norm'")
        try:
            with handle.generation(num_steps=STEPS):
                outputs.append(
                    euler_sample(model, "dit", inputs, STEPS, tiny_uncond_inputs("dit", inputs), handle=handle)
                )
            assert handle.stats().last.token_fraction < 1.0
        finally:
            handle.remove()
    torch.testing.assert_close(outputs[0][:1], outputs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["dit", "wan"])
def test_full_context_attention_equals_the_full_block_on_kept_tokens(family):
    """attention="all" (DiT, Wan): the running tokens attend to every token, so their outputs are the full
    block's; the model's attention processors are back in place afterwards."""

    @dataclasses.dataclass(frozen=True)
    class ProbeConfig(PolicyConfig):
        pass

    diffs: list[float] = []

    ProbeConfig.__name__ = f"ProbeConfig{family}"

    @register_policy(ProbeConfig)
    class Probe(Policy):
        uses_block_hooks = True

        def block(self, call):
            full = call.outputs_of(call.run())["hidden_states"]
            index = torch.tensor([[0, 3, 5, 9], [1, 2, 12, 15]])[: full.shape[0]]
            update = torch.zeros_like(full)
            partial, _ = run_cached_block(call, index, update, full_context=True)
            partial = call.outputs_of(partial)["hidden_states"]
            gather = index.unsqueeze(-1).expand(-1, -1, full.shape[-1])
            diffs.append(float((partial.gather(1, gather) - full.gather(1, gather)).abs().max()))
            return call.run()

    model = _model(family)
    processors = [type(getattr(getattr(b, "attn1", None), "processor", None)).__name__ for b in model.modules()]
    handle = ditcache.apply(model, ProbeConfig())
    try:
        _generate(family, handle, steps=2, batch=2)
    finally:
        handle.remove()
    assert diffs and max(diffs) < 1e-5
    assert [type(getattr(getattr(b, "attn1", None), "processor", None)).__name__ for b in model.modules()] == processors


def test_lora_loads_on_apply_and_leaves_the_model_unchanged(profile_dir):
    model = _model("dit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _generate("dit")
    with_lora, _, policy = _run("dit", "tokencache:ratio=0.5")
    assert policy._setups[STEPS].lora is not None
    without, _, _ = _run("dit", "tokencache:ratio=0.5:lora=False")
    assert not torch.equal(with_lora, without)  # the refiner ran with its LoRA at P-steps
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module)
    assert torch.equal(_generate("dit"), reference)


def test_lora_merged_inference_equals_the_hooked_delta_and_restores_parameters():
    from ditcache.calibration.tokencache_predictor import LoRA

    model = tiny_model("dit")  # its own copy: the test edits a weight in place
    position = len(model.transformer_blocks) - 1
    block = model.transformer_blocks[position]
    lora = LoRA({position: block}, rank=4)
    for adapter in lora.adapters.values():
        torch.nn.init.normal_(adapter.up.weight, std=0.05)  # a non-zero delta
    lora.eval()
    linear = block.ff.net[2]
    params = dict(block.named_parameters())
    probe = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad(), lora.applied(position, block):  # training path: forward hooks
        hooked = linear(probe).detach()
    with torch.no_grad(), lora.applied(position, block):  # inference path: a merged weight swapped in
        assert linear.weight is not params["ff.net.2.weight"]
        merged = linear(probe)
    assert torch.allclose(hooked, merged, atol=1e-5)
    assert not torch.allclose(merged, linear(probe), atol=1e-4)  # the delta mattered
    assert dict(block.named_parameters()) == params  # the same Parameter objects are back
    assert not any(m._forward_hooks for m in block.modules())
    with torch.no_grad():
        linear.weight.add_(1.0)  # an in-place edit of the base weight: the merged copy is rebuilt from it
        with lora.applied(position, block):
            again = linear(probe)
        linear.weight.sub_(1.0)
    assert torch.allclose(again, merged + probe.sum(-1, keepdim=True), atol=1e-4)


def test_refiners_zero_caches_every_block(profile_dir):
    _, stats, policy = _run("dit", "tokencache:refiners=0:ratio=1")
    assert policy._setups[STEPS].lora is None
    assert stats.block_tokens[-1] < 16 * 2 * STEPS  # the last block caches too


def test_a_profile_trained_without_refiners_loads_and_caches_every_block(tmp_path):
    model, family = _model("dit"), "dit"
    inputs = tiny_inputs(family)
    uncond = tiny_uncond_inputs(family, inputs)

    def run(handle):
        return euler_sample(model, family, inputs, STEPS, uncond, handle=handle)

    options = TrainOptions(refiners=0, iterations=3, lora_iterations=3, progress=False)
    profile = train_tokencache(model, CalibrationRun(run, STEPS, 3.0), "tiny-dit", options)
    assert profile.data["lora_rank"] is None and profile.data["lora_positions"] == []
    path = profile.save(tmp_path / "k0.json")
    _, stats, policy = _run(family, f"tokencache:ratio=1:profile='{path}'")
    assert policy._setups[STEPS].refiners == 0 and policy._setups[STEPS].lora is None
    assert stats.block_tokens[-1] < 16 * 2 * STEPS  # the last block caches too


def test_missing_profile_names_the_calibration_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    handle = ditcache.apply(_model("flux"), "tokencache")
    try:
        with pytest.raises(ProfileMismatchError, match="ditcache calibrate tokencache"):
            _generate("flux", handle, steps=7)
    finally:
        handle.remove()


def test_needs_the_step_count(profile_dir):
    model = _model("dit")
    handle = ditcache.apply(model, "tokencache")
    try:
        inputs = tiny_inputs("dit")
        cond = {k: v for k, v in inputs.items() if k != "hidden_states"}
        with pytest.raises(ValueError, match="number of sampling steps"):
            model(hidden_states=inputs["hidden_states"], timestep=torch.tensor([900.0]), **cond)
    finally:
        handle.remove()


def test_attention_all_is_refused_where_unsupported(profile_dir):
    handle = ditcache.apply(_model("flux"), "tokencache:attention='all'")
    try:
        with pytest.raises(ValueError, match='attention="all"'):
            _generate("flux", handle)
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": "0.9"}, "ratio"),
        ({"full_steps": 0}, "full_steps"),
        ({"full_steps": 1.0}, "full_steps"),
        ({"full_steps": 0.0}, "full_steps"),
        ({"beta": float("nan")}, "beta"),
        ({"schedule": "reverse"}, "schedule"),
        ({"selection": "tome"}, "selection"),
        ({"refiners": -1}, "refiners"),
        ({"refiners": 1.5}, "refiners"),
        ({"lora": 1}, "lora"),
        ({"attention": "full"}, "attention"),
        ({"seed": -1}, "seed"),
        ({"per_row": 1}, "per_row"),
        ({"profile": 3}, "profile"),
    ],
)
def test_every_knob_is_validated(changes, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        ditcache.TokenCacheConfig(**changes)


def test_presets_and_full_step_share():
    assert ditcache.preset("tokencache") == ditcache.TokenCacheConfig()
    assert ditcache.TokenCacheConfig(full_steps=0.2).full_step_count(50) == 10
    assert ditcache.TokenCacheConfig(full_steps=0.2).full_step_count(6) == 1
    assert ditcache.TokenCacheConfig(full_steps=12).full_step_count(8) == 8
    for name in ("tokencache-fast", "tokencache-safe"):
        assert isinstance(ditcache.preset(name), ditcache.TokenCacheConfig)


def test_train_options_are_validated():
    with pytest.raises(ValueError, match="lora_rank"):
        TrainOptions(lora_rank=0)
    with pytest.raises(ValueError, match="lambda_"):
        TrainOptions(lambda_=-1.0)


def test_profile_path_override(profile_dir, monkeypatch, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = _profile("dit").save(elsewhere / "my-tokencache.json")
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path_factory.mktemp("empty")))
    out, stats, _ = _run("dit", f"tokencache:profile={str(path)!r}")
    assert stats.token_fraction < 1.0 and Path(path).with_suffix(".safetensors").exists()


@pytest.mark.parametrize(("per_row", "runs_per_block"), [(None, 2), (False, 1), (True, 2)])
def test_flux_rows_per_row_or_shared(profile_dir, per_row, runs_per_block):
    """Flux's rotary table has no batch axis: per-row token sets (the default) run row by row; per_row=False
    shares the tokens of the row-averaged scores (one subset run per block)."""
    spec = "tokencache:ratio=0.5" + ("" if per_row is None else f":per_row={per_row}")
    handle = ditcache.apply(_model("flux"), spec)
    try:
        _generate("flux", handle, batch=2)
        records = [r for r in handle.records() if r.token_runs]
    finally:
        handle.remove()
    assert records
    for record in records:
        subset_runs = [key for key in record.token_runs if isinstance(key[0], int)]
        cached_blocks = sum(0 < tokens < 64 for tokens in record.block_tokens)
        assert len(subset_runs) == runs_per_block * cached_blocks


def test_cli_knows_the_calibration_and_the_bench_set():
    from ditcache.bench.runner import DEFAULT_POLICIES
    from ditcache.cli import build_parser

    args = build_parser().parse_args(["calibrate", "tokencache", "--model", "ref-dit", "--steps", "50"])
    assert (args.method, args.model, args.steps) == ("tokencache", "ref-dit", 50)
    assert "tokencache" in DEFAULT_POLICIES
    shipped = Path(ditcache.calibration.profiles.PROFILE_DIR)
    for model in ("ref-image", "ref-video", "ref-dit"):
        weights = shipped / f"tokencache-{model}-50.safetensors"
        assert weights.exists() and weights.stat().st_size <= 2 * 1024 * 1024


# ------------------------------------------------------------------------------------------------- dataset data
def test_dataset_generation_feeds_noised_latents_and_trains():
    from ditcache.calibration.dataset import flow_noise, noised_data_run
    from ditcache.calibration.record import record
    from ditcache.calibration.tokencache import TokenCacheRecordConfig

    family = "dit"
    model = _model(family)
    inputs = tiny_inputs(family, batch=2)
    latents = inputs.pop("hidden_states")
    inputs.pop("timestep", None)
    uncond = {**inputs, "class_labels": torch.zeros_like(inputs["class_labels"])}
    timesteps = torch.linspace(900, 100, STEPS)
    generation = noised_data_run(model, latents, timesteps, flow_noise, {"cond": inputs, "uncond": uncond}, seed=5)
    recorder, _ = record(model, TokenCacheRecordConfig(), generation)
    assert sorted(recorder.arguments) == [(b, s) for b in ("cond", "uncond") for s in range(STEPS)]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    for step in (0, STEPS - 1):
        sigma = float(timesteps[step]) / 1000
        expected = (1 - sigma) * latents + sigma * noise  # x_t from the clean latents, the same noise draw
        assert torch.allclose(recorder.arguments[("cond", step)]["hidden_states"], expected, atol=1e-6)
        assert float(recorder.arguments[("uncond", step)]["timestep"][0]) == pytest.approx(float(timesteps[step]))
    options = TrainOptions(iterations=30, lora_iterations=0, progress=False, seed=1)
    profile = train_tokencache(model, generation, "tiny-dit", options)
    assert profile.data["loss"]["predictor"]["last"] < profile.data["loss"]["predictor"]["first"]
    assert profile.data["data"] == "dataset"


def test_dataset_generation_rejects_bad_input():
    from ditcache.calibration.dataset import flow_noise, noised_data_run

    model = _model("dit")
    with pytest.raises(ValueError, match="branches"):
        noised_data_run(model, torch.zeros(1, 4, 8, 8), [500], flow_noise, {})
    with pytest.raises(ValueError, match="timesteps"):
        noised_data_run(model, torch.zeros(1, 4, 8, 8), [], flow_noise, {"cond": {}})


def test_cli_dataset_option_is_for_reference_models(capsys):
    from ditcache import cli

    assert cli.main(["calibrate", "tokencache", "--pipeline", "x", "--data", "dataset"]) != 0
    assert "--data dataset is for reference models" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ref-dit", "ref-image"])
def test_reference_dataset_generation_noises_the_training_data(name):
    from ditcache.calibration.record import record
    from ditcache.calibration.tokencache import TokenCacheRecordConfig
    from ditcache.refmodels import RefPipeline

    pipe = RefPipeline.from_pretrained(name)
    generation = pipe.dataset_calibration_run(4, 2, seed=3)
    recorder, clean = record(pipe.transformer, TokenCacheRecordConfig(), generation)
    assert sorted(recorder.arguments) == [(b, s) for b in ("cond", "uncond") for s in range(4)]
    first, last = (recorder.arguments[("cond", s)]["hidden_states"] for s in (0, 3))
    # Step 0 is (almost) pure noise, the last step close to the clean training sample.
    assert float((last - clean).pow(2).mean()) < 0.5 * float((first - clean).pow(2).mean())
    assert generation.meta["data"] == "dataset" and generation.meta["guidance"] == pipe.spec.guidance
