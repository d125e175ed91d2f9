"""SanaTransformer2DModel (Sana): one list of linear-attention blocks whose feed-forward (GLUMBConv) is a
3x3 depthwise convolution over the (height, width) token grid.

The convolution needs every token of the grid, so no token-subset method applies (`no_token_subsets`);
block, step and attention / MLP reuse do. SanaPipeline batches CFG into one forward (uncond rows first).
"""

from __future__ import annotations

from diffusers import SanaTransformer2DModel

from .base import BlockListSpec, ModelAdapter, ada_norm_single_modulated_input, patch_grid, square_patch

SANA = ModelAdapter(
    name="sana",
    model_class=SanaTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatial",
            attention=("attn1", "attn2"),
            mlp=("ff",),
            no_token_subsets="its feed-forward (GLUMBConv) is a 3x3 convolution over the full (height, width) grid",
        ),
    ),
    latent_layout="BCHW",
    grid=patch_grid,
    patch=square_patch,
    modulated_input=ada_norm_single_modulated_input,
    pipeline_cfg="batched: one forward on [uncond; cond] rows, no cache context",
)
