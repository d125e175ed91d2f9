"""NoCache: every hook installed, nothing ever reused. Proves the engine itself changes no output."""

from __future__ import annotations

import dataclasses

from ..config import PolicyConfig
from ..registry import register_policy, register_preset
from .base import Policy


@dataclasses.dataclass(frozen=True)
class NoCacheConfig(PolicyConfig):
    r"""
    No caching: install the engine (model and block hooks) but compute every step and every block.

    The output is bit-identical to the uncached model. It is the exactness check of the engine and the
    reference that benchmarks compare the other policies against (preset `"none"`). Not a published method.

    Args:
        This config has no fields.

    Example:
        >>> import torch
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model, inputs = tiny_model("flux"), tiny_inputs("flux")
        >>> reference = euler_sample(model, "flux", inputs, steps=3)
        >>> handle = ditcache.apply(model, ditcache.NoCacheConfig())  # or ditcache.apply(model, "none")
        >>> torch.equal(euler_sample(model, "flux", inputs, steps=3, handle=handle), reference)
        True
        >>> handle.remove()
    """


@register_policy(NoCacheConfig)
class NoCachePolicy(Policy):
    uses_block_hooks = True


register_preset("none", NoCacheConfig, "no caching (hooks installed, every step and block computed)")
