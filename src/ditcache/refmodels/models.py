"""The reference models: small diffusers transformers plus a learned class encoder.

`ref-image` is a `FluxTransformer2DModel` on 32x32 RGB pixels (packed 4x4 -> 64 tokens of 48 channels);
`ref-video` is a `WanTransformer3DModel` on 8 frames of 16x16 RGB pixels (patch 1x2x2 -> 512 tokens);
`ref-dit` is a class-conditional `DiTTransformer2DModel` on 32x32 RGB pixels (patch 2 -> 256 tokens),
epsilon prediction with DDPM training and DDIM sampling (TokenCache's setting);
`ref-latte` is a `LatteTransformer3DModel` on 8 frames of 16x16 RGB pixels (patch 2 -> 8 x 64 tokens,
alternating spatial and temporal blocks; OmniCache's video model).
The "text encoder" is a class embedding (`ClassEncoder`): `num_classes + 1` entries, the last one is the
null class used for classifier-free guidance. DiT embeds its class labels itself (its null class is
`num_classes` too), so `ref-dit` has no encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, LatteTransformer3DModel, WanTransformer3DModel

from ..adapters.flux import flux_image_ids
from .data import CLASS_PHOTOS


@dataclasses.dataclass(frozen=True)
class RefModelSpec:
    name: str
    family: str  # "flux" | "wan" | "dit" | "latte"
    transformer: dict[str, Any]  # kwargs of the diffusers class
    sample_shape: tuple[int, ...]  # (3, H, W) or (3, F, H, W), pixels in [-1, 1]
    text_tokens: int = 4
    text_dim: int = 64
    pooled_dim: int = 64
    num_classes: int = len(CLASS_PHOTOS)
    pack: int = 4  # Flux only: pixels packed per token side
    # "flow": rectified flow, velocity prediction, FlowMatchEuler sampling; "epsilon": DDPM noise prediction,
    # DDIM sampling.
    prediction: str = "flow"
    # The reference model whose data (and so whose shipped sample classifier) this one shares.
    data_of: str | None = None
    # Default classifier-free guidance scale: 4 for the flow models; 1.5 for ref-dit, as DiT samples (a
    # short-trained epsilon model over-saturates at higher scales).
    guidance: float = 4.0

    @property
    def classifier_name(self) -> str:
        return self.data_of or self.name

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def is_video(self) -> bool:
        return len(self.sample_shape) == 4


REF_IMAGE = RefModelSpec(
    name="ref-image",
    family="flux",
    transformer=dict(
        patch_size=1,
        in_channels=48,
        out_channels=48,
        num_layers=1,
        num_single_layers=5,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    ),
    sample_shape=(3, 32, 32),
)

REF_VIDEO = RefModelSpec(
    name="ref-video",
    family="wan",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=24,
        in_channels=3,
        out_channels=3,
        text_dim=64,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ),
    sample_shape=(3, 8, 16, 16),
    pooled_dim=0,
)

REF_DIT = RefModelSpec(
    name="ref-dit",
    family="dit",
    transformer=dict(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=3,
        out_channels=3,
        num_layers=6,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=len(CLASS_PHOTOS),  # + 1 null class (DiT's label dropout table)
    ),
    sample_shape=(3, 32, 32),
    text_tokens=0,
    text_dim=0,
    pooled_dim=0,
    prediction="epsilon",
    data_of="ref-image",
    guidance=1.5,
)

REF_LATTE = RefModelSpec(
    name="ref-latte",
    family="latte",
    transformer=dict(
        num_attention_heads=4,
        attention_head_dim=24,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        cross_attention_dim=96,
        sample_size=16,
        patch_size=2,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=64,
        video_length=8,
    ),
    sample_shape=(3, 8, 16, 16),
    pooled_dim=0,
    data_of="ref-video",
)

SPECS = {spec.name: spec for spec in (REF_IMAGE, REF_VIDEO, REF_DIT, REF_LATTE)}
_CLASSES = {
    "flux": FluxTransformer2DModel,
    "wan": WanTransformer3DModel,
    "dit": DiTTransformer2DModel,
    "latte": LatteTransformer3DModel,
}


def get_spec(name: str) -> RefModelSpec:
    if name not in SPECS:
        raise ValueError(f"model must be one of {', '.join(SPECS)}; got {name!r}")
    return SPECS[name]


class ClassEncoder(torch.nn.Module):
    """Stand-in text encoder: class id -> (text_tokens, text_dim) embeddings and a pooled vector."""

    def __init__(self, num_classes: int, text_tokens: int, text_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.text_tokens, self.text_dim = text_tokens, text_dim
        self.tokens = torch.nn.Embedding(num_classes + 1, text_tokens * text_dim)
        self.pooled = torch.nn.Embedding(num_classes + 1, pooled_dim) if pooled_dim else None
        torch.nn.init.normal_(self.tokens.weight, std=0.5)
        if self.pooled is not None:
            torch.nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.tokens(labels).view(-1, self.text_tokens, self.text_dim)  # (B, T, D)
        pooled = self.pooled(labels) if self.pooled is not None else None  # (B, P)
        return tokens, pooled


class RefModel(torch.nn.Module):
    """Transformer + class encoder, and the glue that turns pixels into the transformer's inputs."""

    def __init__(self, spec: RefModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.transformer = _CLASSES[spec.family](**spec.transformer)
        self.encoder = (
            ClassEncoder(spec.num_classes, spec.text_tokens, spec.text_dim, spec.pooled_dim)
            if spec.text_tokens
            else None
        )

    def model_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Everything but the timestep, for a pixel batch `x` and class ids `labels`."""
        if self.encoder is None:  # DiT: class labels go straight in
            return {"hidden_states": x, "class_labels": labels}
        tokens, pooled = self.encoder(labels)
        if self.spec.family == "flux":
            img_ids, txt_ids = flux_ids(self.spec)
            return {
                "hidden_states": pack(x, self.spec.pack),
                "encoder_hidden_states": tokens,
                "pooled_projections": pooled,
                "img_ids": img_ids,
                "txt_ids": txt_ids,
            }
        return {"hidden_states": x, "encoder_hidden_states": tokens}

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's prediction in pixel layout: velocity ("flow") or noise ("epsilon"). `timestep` per sample
        in the schedulers' units, [0, 1000] (flow: 1000 * sigma, 1000 = pure noise)."""
        inputs = self.model_inputs(x, labels)
        if self.spec.family == "flux":
            timestep = timestep / 1000.0  # Flux embeds sigma
        out = self.transformer(timestep=timestep, return_dict=False, **inputs)[0]
        return self.from_model_output(out)

    def from_model_output(self, out: torch.Tensor) -> torch.Tensor:
        if self.spec.family == "flux":
            return unpack(out, self.spec.pack, self.spec.sample_shape[-2:])
        return out


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), Flux's packed-token layout."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: torch.Tensor, p: int, hw: tuple[int, int]) -> torch.Tensor:
    b, _, d = tokens.shape
    h, w = hw
    c = d // (p * p)
    x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def flux_ids(spec: RefModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    gh, gw = spec.sample_shape[1] // spec.pack, spec.sample_shape[2] // spec.pack
    return flux_image_ids(gh, gw), torch.zeros(spec.text_tokens, 3)
