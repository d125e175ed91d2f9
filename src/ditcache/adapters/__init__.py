"""Adapter registry: diffusers transformer class -> `ModelAdapter`.

Lookup is by exact class first, then by the nearest registered base class (so a subclass of a supported
model works), never by name guessing.
"""

from __future__ import annotations

import torch

from .allegro import ALLEGRO
from .auraflow import AURAFLOW
from .base import (
    BLOCK_KINDS,
    EXECUTION_ORDERS,
    TOKEN_ORDERS,
    BlockListSpec,
    LatentGrid,
    ModelAdapter,
    PositionTable,
    TokenArg,
)
from .chroma import CHROMA
from .cogvideox import COGVIDEOX
from .cogview4 import COGVIEW4
from .cosmos import COSMOS
from .dit import DIT
from .flux import FLUX
from .flux2 import FLUX2
from .hidream import HIDREAM
from .hunyuan_video import HUNYUAN_VIDEO
from .hunyuanimage import HUNYUANIMAGE
from .latte import LATTE
from .ltx import LTX
from .lumina2 import LUMINA2
from .mochi import MOCHI
from .pixart import PIXART
from .qwenimage import QWENIMAGE
from .sana import SANA
from .sd3 import SD3
from .skyreels_v2 import SKYREELS_V2
from .wan import WAN

_ADAPTERS: dict[type[torch.nn.Module], ModelAdapter] = {}

REGISTER_HOWTO = """\
To add a model, describe it with flat data and register it:

    from ditcache.adapters import BlockListSpec, ModelAdapter, LatentGrid, register_adapter
    register_adapter(ModelAdapter(
        name="mymodel", model_class=MyTransformer,
        block_lists=(BlockListSpec(attr="blocks", inputs=("hidden_states",), outputs=("hidden_states",)),),
        latent_layout="BCHW", grid=lambda model, kwargs: LatentGrid(1, h, w),
    ))"""


def register_adapter(adapter: ModelAdapter, *, replace: bool = False) -> ModelAdapter:
    if adapter.model_class in _ADAPTERS and not replace:
        raise ValueError(f"{adapter.model_class.__name__} already has an adapter; pass replace=True to override")
    _ADAPTERS[adapter.model_class] = adapter
    return adapter


def supported_models() -> list[str]:
    return sorted(cls.__name__ for cls in _ADAPTERS)


def registered_adapters() -> list[ModelAdapter]:
    """Every registered adapter, by class name."""
    return sorted(_ADAPTERS.values(), key=lambda adapter: adapter.model_class.__name__)


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    from ..engine.compiled import unwrap_compiled  # the adapter of `torch.compile(model)` is the model's

    return adapter_for_class(type(unwrap_compiled(model)))


def adapter_for_class(model_class: type[torch.nn.Module]) -> ModelAdapter:
    for cls in model_class.__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    raise TypeError(
        f"{model_class.__name__} is not a supported model. Supported: {', '.join(supported_models())}.\n"
        + REGISTER_HOWTO
    )


for _adapter in (FLUX, SD3, WAN, DIT, LATTE):
    register_adapter(_adapter)
_IMAGE = (PIXART, QWENIMAGE, CHROMA, SANA, LUMINA2, HIDREAM, FLUX2, COGVIEW4, AURAFLOW, HUNYUANIMAGE)
for _adapter in _IMAGE:  # image families (issue 15)
    register_adapter(_adapter)
for _adapter in (HUNYUAN_VIDEO, COGVIDEOX, LTX, MOCHI, ALLEGRO, SKYREELS_V2, COSMOS):  # video families
    register_adapter(_adapter)

__all__ = [
    "BLOCK_KINDS",
    "BlockListSpec",
    "EXECUTION_ORDERS",
    "LatentGrid",
    "ModelAdapter",
    "PositionTable",
    "TOKEN_ORDERS",
    "TokenArg",
    "adapter_for",
    "adapter_for_class",
    "register_adapter",
    "registered_adapters",
    "supported_models",
]
