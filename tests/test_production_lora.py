"""Weight changes while a handle is applied (issue 18): loading, fusing, unfusing, unloading, re-weighting or
hot-swapping a LoRA mid-generation makes the next step recompute, and the steps after the change equal a
fresh cached run of the changed model from there; fingerprint-bound profiles are checked again."""

import pytest
import torch

import ditcache
from ditcache.calibration.profiles import ProfileMismatchError
from ditcache.testing import tiny_inputs, tiny_model, write_tiny_profiles

peft = pytest.importorskip("peft")

STEPS, CHANGE_AT = 6, 3  # static-2 / fora-2 reuse at steps 3 and 5 (2 warm-up steps, interval 2)
TARGETS = ["to_q", "to_k", "to_v", "proj_out"]


def _add_lora(model: torch.nn.Module, name: str = "a", seed: int = 5) -> None:
    torch.manual_seed(seed)  # init_lora_weights=False: random non-zero B, so the LoRA changes the output
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config, adapter_name=name)


def _hotswap(model: torch.nn.Module) -> None:
    """What `load_lora_adapter(..., hotswap=True)` does: same-rank weights copied in through `.data`."""
    from peft.utils import get_peft_model_state_dict
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    state = {
        key.replace(".lora_A.", ".lora_A.a.").replace(".lora_B.", ".lora_B.a."): 2 * value  # keys name the adapter
        for key, value in get_peft_model_state_dict(model, adapter_name="a").items()
    }
    hotswap_adapter_from_state_dict(model, state, adapter_name="a", config=model.peft_config["a"])


CHANGES = {
    "load": _add_lora,
    "fuse": lambda model: model.fuse_lora(),
    "unload": lambda model: model.unload_lora(),
    "set_adapters": lambda model: model.set_adapters(["a"], weights=[0.25]),
    "disable": lambda model: model.disable_lora(),
    "hotswap": _hotswap,
    "load_state_dict": lambda model: model.load_state_dict(tiny_model("flux", seed=7).state_dict()),
    "replace_module": lambda model: setattr(model, "proj_out", tiny_model("flux", seed=7).proj_out),
    "replace_parameter": lambda model: setattr(
        model.proj_out, "weight", torch.nn.Parameter(2 * model.proj_out.weight.detach())
    ),
}
NEEDS_ADAPTER = {"fuse", "unload", "set_adapters", "disable", "hotswap"}  # acts on a LoRA loaded before apply


def _model(change: str) -> torch.nn.Module:
    model = tiny_model("flux")
    if change in NEEDS_ADAPTER:
        _add_lora(model)
    return model


def _sample(model, x, steps: range, change=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Flow-matching Euler over `steps` with the step index given to ditcache (as pipelines do); `change`
    runs before step CHANGE_AT. Returns the final latent and the latent entering each step."""
    inputs = {k: v for k, v in tiny_inputs("flux").items() if k != "hidden_states"}
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    entering = []
    with torch.no_grad():
        for i in steps:
            if change is not None and i == CHANGE_AT:
                change(model)
            entering.append(x)
            t = torch.full((x.shape[0],), float(sigmas[i]))
            with ditcache.cache_context(model, "cond", step_index=i, num_inference_steps=STEPS):
                v = model(hidden_states=x, timestep=t, return_dict=False, **inputs)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, entering


@pytest.mark.parametrize("preset", ["static-2", "fora-2"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_weight_change_mid_generation_recomputes(preset, change):
    model = _model(change)
    handle = ditcache.apply(model, preset)
    start = tiny_inputs("flux")["hidden_states"]
    output, entering = _sample(model, start, range(STEPS), change=CHANGES[change])
    stats = handle.stats().generations
    assert len(stats) == 1  # the generation goes on; only what was cached is dropped
    blocks = stats[0].blocks_computed
    full = float(stats[0].blocks_total)
    assert blocks[CHANGE_AT] == full, f"step {CHANGE_AT} reused features of the old weights: {blocks}"
    assert blocks[CHANGE_AT + 2] < full  # caching goes on after the change
    handle.remove()

    # Reference: the changed model, cached from step CHANGE_AT on as a new generation, from the same latent.
    reference_model = _model(change)
    CHANGES[change](reference_model)
    reference = ditcache.apply(reference_model, preset)
    expected, _ = _sample(reference_model, entering[CHANGE_AT], range(CHANGE_AT, STEPS))
    assert reference.stats().generations[0].blocks_computed == blocks[CHANGE_AT:]
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)
    reference.remove()


def test_unchanged_weights_keep_reusing():
    """No false alarm: a LoRA loaded before apply, untouched, leaves the usual reuse in place."""
    model = _model("fuse")
    handle = ditcache.apply(model, "static-2")
    _sample(model, tiny_inputs("flux")["hidden_states"], range(STEPS))
    assert handle.stats().generations[0].reused == [(3, "cond"), (5, "cond")]
    assert handle._engine.weights.epoch == 0
    handle.remove()


def test_weights_moved_by_offloading_keep_reusing():
    """Offloading moves the same values to new storage at every forward (`param.data = param.data.to(...)`):
    not a change, so reuse goes on."""

    def move(model):
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()

    model = _model("fuse")
    handle = ditcache.apply(model, "static-2")
    _sample(model, tiny_inputs("flux")["hidden_states"], range(STEPS), change=move)
    assert handle.stats().generations[0].reused == [(3, "cond"), (5, "cond")]
    handle.remove()


def test_profile_is_checked_again_after_a_weight_change(tmp_path, monkeypatch):
    """A profile is bound to the weights it was calibrated on (`model_fingerprint`): loading a LoRA while
    MixCache runs on a tiny profile makes the next forward fail with ProfileMismatchError, as applying the
    profile to the changed model would."""
    model = tiny_model("flux")
    write_tiny_profiles(tmp_path, model, [STEPS], methods=["mixcache"])
    monkeypatch.setenv("DITCACHE_PROFILE_DIR", str(tmp_path))
    handle = ditcache.apply(model, "mixcache-acc")
    with pytest.raises(ProfileMismatchError, match="fingerprint"):
        _sample(model, tiny_inputs("flux")["hidden_states"], range(STEPS), change=_add_lora)
    assert [record.step for record in handle.records()] == list(range(CHANGE_AT))
    handle.remove()
