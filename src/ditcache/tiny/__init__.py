"""Tiny configurations of every supported diffusers transformer, one file per family (see `base.py`).

Adding a family: a file here that calls `register_tiny(TinyFamily(...))` and an import line below.
"""

from . import dit, flux, latte, sd3, wan  # noqa: F401  (registration)
from . import allegro, cogvideox, cosmos, hunyuan_video, ltx, mochi, skyreels_v2  # noqa: F401  (video)
from .base import Inputs, TinyFamily, family_of, register_tiny, tiny_families, tiny_family

__all__ = ["Inputs", "TinyFamily", "family_of", "register_tiny", "tiny_families", "tiny_family"]
