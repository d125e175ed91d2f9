"""Typed per-branch policy state (like diffusers' `FBCSharedBlockState`): a dataclass whose `reset()` puts
every field back to its default. The engine gives each CFG branch its own instance and resets it when a
forward produced or stored NaN / inf."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class BranchState:
    """Base of every policy's per-branch state; subclasses are dataclasses with a default for each field."""

    def reset(self) -> None:
        fresh = type(self)()
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(fresh, field.name))
