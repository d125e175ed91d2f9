"""HunyuanVideoTransformer3DModel: dual-stream blocks (video and text apart, joint attention), then
single-stream blocks (one concatenated [video; text] sequence), as in Flux.

Both lists take `(hidden_states, encoder_hidden_states, temb, attention_mask, rotary, token_replace_emb,
first_frame_num_tokens)` positionally and return `(hidden_states, encoder_hidden_states)`. Tokens are the
frame-major (frame, row, column) patches of the (B, C, F, H, W) latent. The rotary table ((cos, sin), each
(N_video, D), no batch axis) covers the video tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import HunyuanVideoTransformer3DModel

from .base import BlockListSpec, LatentGrid, ModelAdapter, PositionTable, TokenArg, adaln_zero_modulated_input

# Token subsets: the model builds one attention mask (B, 1, 1, N_video + N_text) over [video; text] keys, video
# first, which a subset would have to shorten in its middle; the image-to-video variant ("token_replace") also
# treats the first `first_frame_num_tokens` tokens of the stream as the first frame.
_NO_TOKEN_SUBSETS = (
    "its attention mask spans [video; text] keys with the text after the video (the engine keeps only a text "
    "prefix whole), and the token_replace variant reads the first frame from the stream's first tokens"
)


def _hunyuan_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> LatentGrid:
    latent = kwargs["hidden_states"]  # (B, C, F, H, W)
    p, pt = model.config.patch_size, model.config.patch_size_t
    return LatentGrid(
        frames=latent.shape[2] // pt, height=latent.shape[3] // p, width=latent.shape[4] // p, patch=(pt, p, p)
    )


HUNYUAN_VIDEO = ModelAdapter(
    name="hunyuan-video",
    model_class=HunyuanVideoTransformer3DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states", "encoder_hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("ff", "ff_context"),
            token_args=(TokenArg("freqs_cis", dim=0, batch="shared"),),
            no_token_subsets=_NO_TOKEN_SUBSETS,
        ),
        BlockListSpec(
            attr="single_transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("hidden_states", "encoder_hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("proj_mlp",),
            token_args=(TokenArg("image_rotary_emb", dim=0, batch="shared"),),
            no_token_subsets=_NO_TOKEN_SUBSETS,
        ),
    ),
    latent_layout="BCFHW",
    grid=_hunyuan_grid,
    patch=lambda model: (model.config.patch_size_t, model.config.patch_size, model.config.patch_size),
    modulated_input=adaln_zero_modulated_input,
    pipeline_cfg=(
        "separate forwards: cache_context('cond'), then cache_context('uncond') only with true_cfg_scale > 1 and "
        "a negative prompt; the guidance-distilled model embeds the guidance scale (`guidance`), one forward per "
        "step"
    ),
    notes=(
        "Token-subset methods (TokenCache, OmniCache hierarchical) raise: " + _NO_TOKEN_SUBSETS + ". "
        "Everything else applies (the rotary table is computed inside, so trial forwards need no extra kwargs)."
    ),
    position_tables=(PositionTable("rope"),),
)
