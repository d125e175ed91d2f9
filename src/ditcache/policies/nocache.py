"""NoCache: every hook installed, nothing ever reused. Proves the engine itself changes no output."""

from __future__ import annotations

import dataclasses

from ..config import PolicyConfig
from ..registry import register_policy, register_preset
from .base import Policy


@dataclasses.dataclass(frozen=True)
class NoCacheConfig(PolicyConfig):
    """Install the engine (model and block hooks) but always compute."""


@register_policy(NoCacheConfig)
class NoCachePolicy(Policy):
    uses_block_hooks = True


register_preset("none", NoCacheConfig, "no caching (hooks installed, every step and block computed)")
