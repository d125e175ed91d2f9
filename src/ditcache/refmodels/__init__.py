"""Reference models trained by this project on data shipped inside scikit-image."""

from .models import REF_DIT, REF_IMAGE, REF_LATTE, REF_VIDEO, SPECS, RefModel, RefModelSpec, get_spec
from .pipeline import RefPipeline

__all__ = [
    "REF_DIT",
    "REF_IMAGE",
    "REF_LATTE",
    "REF_VIDEO",
    "SPECS",
    "RefModel",
    "RefModelSpec",
    "RefPipeline",
    "get_spec",
]
