from .calls import BlockCall, BlockRef, ForwardCall, sample_of
from .context import ForwardInfo
from .engine import Engine
from .handle import CacheHandle
from .stats import GenerationStats, Stats

__all__ = [
    "BlockCall",
    "BlockRef",
    "CacheHandle",
    "Engine",
    "ForwardCall",
    "ForwardInfo",
    "GenerationStats",
    "Stats",
    "sample_of",
]
