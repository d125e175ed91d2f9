"""AuraFlowTransformer2DModel (AuraFlow): MMDiT joint blocks, then single-stream blocks over [text; image].

Positions are learned embeddings added at the input (no rotary table), so the joint blocks' token stream is
the only per-token argument; the single-stream blocks carry one stream [text; image] and are left out of
token subsets. AuraFlowPipeline batches CFG into one forward (uncond rows first) and passes t / 1000.
"""

from __future__ import annotations

from diffusers import AuraFlowTransformer2DModel

from .base import (
    BlockListSpec,
    ModelAdapter,
    adaln_zero_modulated_input,
    concatenated_stream_list,
    patch_grid,
    square_patch,
)

AURAFLOW = ModelAdapter(
    name="auraflow",
    model_class=AuraFlowTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="joint_transformer_blocks",
            inputs=("hidden_states", "encoder_hidden_states"),
            outputs=("encoder_hidden_states", "hidden_states"),
            kind="joint",
            attention=("attn",),
            mlp=("ff", "ff_context"),
        ),
        concatenated_stream_list("single_transformer_blocks", mlp=("ff",)),
    ),
    latent_layout="BCHW",
    grid=patch_grid,
    patch=square_patch,
    modulated_input=adaln_zero_modulated_input,
    pipeline_cfg="batched: one forward on [uncond; cond] rows, no cache context",
)
