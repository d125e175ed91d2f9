"""More than one process: context parallelism with decisions in lockstep, and data-parallel generation."""

from ..engine.decisions import Sharding
from .context import enable_context_parallel, set_decision_group, supports_context_parallel
from .launch import DistributedInfo, init_distributed, launched_by_torchrun

__all__ = [
    "DistributedInfo",
    "Sharding",
    "enable_context_parallel",
    "init_distributed",
    "launched_by_torchrun",
    "set_decision_group",
    "supports_context_parallel",
]
