from .calls import BlockCall, BlockRef, ForwardCall, sample_of
from .context import ForwardInfo
from .engine import Engine
from .handle import CacheHandle, PipelineCacheHandle
from .state import BranchState
from .stats import GenerationStats, Stats
from .view import ModelView

__all__ = [
    "BlockCall",
    "BlockRef",
    "BranchState",
    "CacheHandle",
    "PipelineCacheHandle",
    "Engine",
    "ForwardCall",
    "ForwardInfo",
    "GenerationStats",
    "ModelView",
    "Stats",
    "sample_of",
]
