"""PixArtTransformer2DModel (PixArt-alpha / -sigma): one list of adaLN-single `BasicTransformerBlock`s with
cross-attention to the T5 caption.

Image tokens are the row-major patches (`PatchEmbed`); the blocks take the shared adaLN-single embedding as
`timestep` (B, 6 * C), so the token stream is the only per-token argument. PixArtAlphaPipeline and
PixArtSigmaPipeline batch CFG into one forward (uncond rows first) and set no cache context.
"""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel

from .base import BlockListSpec, ModelAdapter, ada_norm_single_modulated_input, patch_grid, square_patch

PIXART = ModelAdapter(
    name="pixart",
    model_class=PixArtTransformer2DModel,
    block_lists=(
        BlockListSpec(
            attr="transformer_blocks",
            inputs=("hidden_states",),
            outputs=("hidden_states",),
            kind="spatial",
            attention=("attn1", "attn2"),
            mlp=("ff",),
        ),
    ),
    latent_layout="BCHW",
    grid=patch_grid,
    patch=square_patch,
    modulated_input=ada_norm_single_modulated_input,
    pipeline_cfg="batched: one forward on [uncond; cond] rows, no cache context",
)
