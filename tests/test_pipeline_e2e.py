"""End to end through a real diffusers FluxPipeline, assembled from tiny components built in code."""

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import ditcache

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _word_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for word in ["a", "photo", "of", "cat", "dog", "red", "blue", "blurry", "ugly", "bad"]:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_length
    )


def tiny_flux_pipeline() -> FluxPipeline:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=16,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(vocab_size=16, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        shift_factor=0.1,
        scaling_factor=0.5,
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=_word_tokenizer(16),
        text_encoder_2=t5,
        tokenizer_2=_word_tokenizer(16),
        transformer=transformer,
    )


def _run(pipe, steps=6):
    return pipe(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=steps,
        height=16,
        width=16,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_flux_pipeline_with_true_cfg_cached_and_uncached():
    pipe = tiny_flux_pipeline()
    reference = _run(pipe)

    handle = ditcache.apply(pipe, "none")
    assert torch.equal(_run(pipe), reference)
    stats = handle.stats().last
    assert stats.forwards == 12 and {b for _, b in stats.reused} == set()
    handle.remove()

    handle = ditcache.apply(pipe, ditcache.StaticIntervalConfig(interval=2, warmup_steps=2, cooldown_steps=1))
    cached = _run(pipe)
    stats = handle.stats().last
    # The step count comes from the pipeline's scheduler, so the last step is a cool-down step.
    assert stats.reused == [(3, "cond"), (3, "uncond")]
    assert not torch.equal(cached, reference)
    second = _run(pipe, steps=8)  # a second call starts a new generation by itself
    assert handle.stats().last.reused_steps == [3, 5]
    assert second.shape == reference.shape
    handle.remove()
    assert torch.equal(_run(pipe), reference)
