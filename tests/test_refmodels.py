"""Reference models: data, packing, training on a tiny config, shipped weights, sampler, classifier."""

import pytest
import torch

import ditcache
from ditcache.metrics.classifier import class_accuracy, load_classifier, real_samples
from ditcache.refmodels import RefModel, RefPipeline, get_spec
from ditcache.refmodels.data import CLASS_PHOTOS, sample_images, sample_videos
from ditcache.refmodels.models import pack, unpack
from ditcache.refmodels.train import train
from ditcache.testing import tiny_ref_image_spec

TINY_IMAGE = tiny_ref_image_spec()


def test_data_is_deterministic_in_range_and_videos_move():
    labels = torch.arange(8)
    a = sample_images(labels, generator=torch.Generator().manual_seed(0))
    b = sample_images(labels, generator=torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    video = sample_videos(labels, frames=8, size=16, generator=torch.Generator().manual_seed(0))
    assert video.shape == (8, 3, 8, 16, 16)
    motion = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    assert (motion > 0.01).all()  # every clip really pans


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 3, 32, 32)
    tokens = pack(x, 4)
    assert tokens.shape == (2, 64, 48)
    assert torch.equal(unpack(tokens, 4, (32, 32)), x)


def test_training_runs_on_a_tiny_config_and_loads_back(tmp_path):
    meta = train("ref-image", spec=TINY_IMAGE, max_steps=3, batch=4, out_dir=tmp_path, progress=False)
    assert meta["steps"] == 3 and meta["final_loss"] == meta["final_loss"]  # finite, not NaN
    pipe = RefPipeline.from_pretrained("ref-image", weights_dir=tmp_path, spec=TINY_IMAGE)
    out = pipe([0, 1], num_inference_steps=3, seed=0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-ref"):
        RefPipeline.from_pretrained("ref-image", weights_dir=tmp_path)


def test_cfg_batched_equals_separate():
    pipe = RefPipeline(RefModel(TINY_IMAGE))
    separate = pipe([0, 3], num_inference_steps=4, seed=1, cfg_mode="separate")
    batched = pipe([0, 3], num_inference_steps=4, seed=1, cfg_mode="batched")
    torch.testing.assert_close(separate, batched, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cfg_mode"):
        pipe([0], cfg_mode="both")


# Fixed outputs of the shipped weights (2 samples, 3 steps, seed 7): sum and first values.
EXPECTED = {
    "ref-image": (1552.8164, [1.1655937, 1.2531140, 1.0102333, 1.0081167]),
    "ref-video": (4397.0793, [-0.7837458, -0.6163016, -1.0161804, -1.6448050]),
    "ref-dit": (1377.2587, [0.5541658, 0.6562832, 0.6392148, 0.6677015]),
    "ref-latte": (8018.3903, [0.1797886, 0.5695481, -0.5676017, -1.0036688]),
}


@pytest.mark.parametrize("name", ["ref-image", "ref-video", "ref-dit", "ref-latte"])
def test_shipped_weights_sample_deterministically(name):
    pipe = RefPipeline.from_pretrained(name)
    a = pipe([0, 5], num_inference_steps=3, seed=7)
    b = pipe([0, 5], num_inference_steps=3, seed=7)
    assert torch.equal(a, b)
    total, first = EXPECTED[name]
    assert float(a.double().sum()) == pytest.approx(total, abs=0.05)
    assert a.flatten()[:4].tolist() == pytest.approx(first, abs=1e-4)
    spec = get_spec(name)
    assert a.shape == (2, *spec.sample_shape) and torch.isfinite(a).all()
    handle = ditcache.apply(pipe, "none")
    assert torch.equal(pipe([0, 5], num_inference_steps=3, seed=7), a)
    handle.remove()


@pytest.mark.parametrize("name", ["ref-image", "ref-video"])
def test_shipped_classifier_recognises_real_samples(name):
    net = load_classifier(name)
    samples, labels = real_samples(name, 64, seed=5)
    assert class_accuracy(net, samples, labels) >= 0.9
    assert len(CLASS_PHOTOS) == 8


def _tiny_spec(name: str):
    """ref-dit / ref-latte's layout on a tiny transformer (2 blocks per list, width 16)."""
    import dataclasses

    from ditcache.refmodels import get_spec

    spec = get_spec(name)
    small = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2)
    if name == "ref-latte":
        small["cross_attention_dim"] = 16
    return dataclasses.replace(spec, transformer=dict(spec.transformer, **small))


@pytest.mark.parametrize("name", ["ref-dit", "ref-latte"])
def test_dit_and_latte_train_and_sample_on_a_tiny_config(name, tmp_path):
    spec = _tiny_spec(name)
    meta = train(name, spec=spec, max_steps=3, batch=4, out_dir=tmp_path, progress=False)
    assert meta["steps"] == 3 and meta["final_loss"] == meta["final_loss"]
    pipe = RefPipeline.from_pretrained(name, weights_dir=tmp_path, spec=spec)
    separate = pipe([0, 8 - 1], num_inference_steps=4, seed=1)
    batched = pipe([0, 8 - 1], num_inference_steps=4, seed=1, cfg_mode="batched")
    assert separate.shape == (2, *spec.sample_shape) and torch.isfinite(separate).all()
    torch.testing.assert_close(separate, batched, rtol=1e-3, atol=1e-4)  # DDIM's x0 step amplifies rounding
    handle = ditcache.apply(pipe, "fora-2")
    cached = pipe([0, 8 - 1], num_inference_steps=4, seed=1)
    stats = handle.stats().last
    handle.remove()
    assert stats.steps == 4 and stats.forwards == 8 and stats.macs_executed < stats.macs_full
    assert not torch.equal(cached, separate)
    assert torch.equal(pipe([0, 8 - 1], num_inference_steps=4, seed=1), separate)  # removed = untouched
    # Batched CFG without any cache context (what DiTPipeline and LattePipeline do): one forward per step,
    # placed from the timestep alone.
    handle = ditcache.apply(pipe.transformer, "fora-2")
    pipe([0, 8 - 1], num_inference_steps=4, seed=1, cfg_mode="batched")
    records = handle.records()
    handle.remove()
    assert [(r.step, r.branch) for r in records] == [(i, "default") for i in range(4)]


def test_ref_dit_samples_with_ddim_and_the_null_class():
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    pipe = RefPipeline(RefModel(_tiny_spec("ref-dit")))
    assert isinstance(pipe.scheduler, DDIMScheduler) and isinstance(pipe.transformer, DiTTransformer2DModel)
    pipe.scheduler.set_timesteps(50)
    assert int(pipe.scheduler.timesteps[0]) == 999 and len(pipe.scheduler.timesteps) == 50
    # DiT's label table has num_classes + 1 rows: the null class used for CFG is the last one.
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == pipe.spec.null_class + 1
    assert pipe.model.encoder is None and set(
        pipe.model.model_inputs(torch.zeros(1, 3, 32, 32), torch.tensor([1]))
    ) == {
        "hidden_states",
        "class_labels",
    }


def test_cli_reference_model_names_match_the_specs():
    from ditcache.cli import REF_MODELS
    from ditcache.refmodels import SPECS, get_spec

    assert tuple(SPECS) == REF_MODELS
    assert get_spec("ref-dit").classifier_name == "ref-image" and get_spec("ref-latte").classifier_name == "ref-video"


def test_training_continues_from_saved_weights(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train("ref-image", spec=TINY_IMAGE, max_steps=2, batch=2, out_dir=first, progress=False)
    meta = train(
        "ref-image",
        spec=TINY_IMAGE,
        max_steps=1,
        batch=2,
        out_dir=second,
        progress=False,
        init_weights=first / "ref-image.safetensors",
    )
    assert meta["steps"] == 1 and [phase["steps"] for phase in meta["phases"]] == [2]
    assert meta["cpu_seconds"] >= 0
    RefPipeline.from_pretrained("ref-image", weights_dir=second, spec=TINY_IMAGE)  # loads back
