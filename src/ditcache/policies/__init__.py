"""One module per method; importing this package registers every policy and preset."""

from .base import Policy
from .mixcache import MixCacheConfig, MixCachePolicy
from .nocache import NoCacheConfig, NoCachePolicy
from .omnicache_hierarchical import OmniCacheHierarchicalConfig, OmniCacheHierarchicalPolicy
from .omnicache_trajectory import OmniCacheTrajectoryConfig, OmniCacheTrajectoryPolicy
from .precisecache import PreciseCacheConfig, PreciseCachePolicy
from .static import ReuseScheduleConfig, ReuseSchedulePolicy, StaticIntervalConfig, StaticIntervalPolicy
from .teacache import TeaCacheConfig, TeaCachePolicy
from .tokencache import TokenCacheConfig, TokenCachePolicy

__all__ = [
    "MixCacheConfig",
    "MixCachePolicy",
    "NoCacheConfig",
    "NoCachePolicy",
    "OmniCacheHierarchicalConfig",
    "OmniCacheHierarchicalPolicy",
    "OmniCacheTrajectoryConfig",
    "OmniCacheTrajectoryPolicy",
    "Policy",
    "PreciseCacheConfig",
    "PreciseCachePolicy",
    "ReuseScheduleConfig",
    "ReuseSchedulePolicy",
    "StaticIntervalConfig",
    "StaticIntervalPolicy",
    "TeaCacheConfig",
    "TeaCachePolicy",
    "TokenCacheConfig",
    "TokenCachePolicy",
]
