"""One module per method; importing this package registers every policy and preset."""

from .base import Policy
from .nocache import NoCacheConfig, NoCachePolicy
from .static import StaticIntervalConfig, StaticIntervalPolicy

__all__ = ["NoCacheConfig", "NoCachePolicy", "Policy", "StaticIntervalConfig", "StaticIntervalPolicy"]
