"""ditcache: feature caching for diffusion transformers.

handle = ditcache.apply(pipe, ditcache.preset("fora-3"))   # or a config object
images = pipe(...)
print(handle.stats().summary())
handle.remove()
"""

from . import policies  # noqa: F401  (registers policies and presets)
from .adapters import BlockListSpec, LatentGrid, ModelAdapter, register_adapter, supported_models
from .api import apply, cache_context
from .calibration.api import calibrate
from .calibration.tune import TuneResult, tune
from .config import PolicyConfig
from .engine import BranchState, CacheHandle, ForwardInfo, ModelView, PipelineCacheHandle, Stats
from .policies import (
    MixCacheConfig,
    NoCacheConfig,
    OmniCacheHierarchicalConfig,
    OmniCacheTrajectoryConfig,
    Policy,
    PreciseCacheConfig,
    ReuseScheduleConfig,
    StaticIntervalConfig,
    TeaCacheConfig,
    TokenCacheConfig,
)
from .policies.auto import AutoConfig
from .registry import config_from_dict, parse_policy, preset, presets, register_policy, register_preset

__version__ = "0.1.0"

__all__ = [
    "cache_context",
    "AutoConfig",
    "BlockListSpec",
    "BranchState",
    "CacheHandle",
    "PipelineCacheHandle",
    "ForwardInfo",
    "LatentGrid",
    "MixCacheConfig",
    "ModelAdapter",
    "ModelView",
    "NoCacheConfig",
    "OmniCacheHierarchicalConfig",
    "OmniCacheTrajectoryConfig",
    "Policy",
    "PolicyConfig",
    "PreciseCacheConfig",
    "ReuseScheduleConfig",
    "StaticIntervalConfig",
    "Stats",
    "TeaCacheConfig",
    "TokenCacheConfig",
    "TuneResult",
    "apply",
    "calibrate",
    "config_from_dict",
    "parse_policy",
    "preset",
    "presets",
    "register_adapter",
    "register_policy",
    "register_preset",
    "supported_models",
    "tune",
]
