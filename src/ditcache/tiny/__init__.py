"""Tiny configurations of every supported diffusers transformer, one file per family (see `base.py`).

Adding a family: a file here that calls `register_tiny(TinyFamily(...))` and an import line below.
"""

from . import (  # noqa: F401  (registration: image and video families)
    allegro,
    auraflow,
    chroma,
    cogvideox,
    cogview4,
    cosmos,
    dit,
    flux,
    flux2,
    hidream,
    hunyuan_video,
    hunyuanimage,
    latte,
    ltx,
    lumina2,
    mochi,
    pixart,
    qwenimage,
    sana,
    sd3,
    skyreels_v2,
    wan,
)
from .base import Inputs, TinyFamily, family_of, register_tiny, tiny_families, tiny_family

__all__ = ["Inputs", "TinyFamily", "family_of", "register_tiny", "tiny_families", "tiny_family"]
