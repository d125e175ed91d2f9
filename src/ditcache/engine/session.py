"""Per-thread generation state of one cached model.

One transformer may serve several threads at once (diffusers' server example shares it between requests). All
that belongs to one generation lives in a `Session`, one per thread: the step tracker, the per-branch policy
states, the policy instance (its cross-branch state), the forward in progress and the layout probe. The first
session gets the policy `apply` made (`handle.policy`); later threads get their own instance, made the same
way and bound to the same model view. What stays shared (records, MACs tables) is guarded by the engine.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from .context import StepTracker
from .layout import LayoutProbe
from .state import BranchState

if TYPE_CHECKING:
    from ..policies.base import Policy
    from .calls import ForwardCall


@dataclasses.dataclass(eq=False)
class Session:
    """One thread's generation on one cached model."""

    tracker: StepTracker
    policy: Policy
    layout: LayoutProbe = dataclasses.field(default_factory=LayoutProbe)
    states: dict[str, BranchState] = dataclasses.field(default_factory=dict)
    active_generation: int | None = None
    current: ForwardCall | None = None  # the model forward in progress (block hooks act only inside one)
    bypass: int = 0  # > 0: forwards run uncached (MACs measurement, trial forwards)


class SessionPool:
    """The session of each thread, made on first use; a finished thread's session is freed with it."""

    def __init__(self, make: Callable[[Policy | None], Session], primary: Policy) -> None:
        self._make = make
        self._primary: Policy | None = primary  # handed to the first session, back when that one is freed
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: weakref.WeakSet[Session] = weakref.WeakSet()

    def current(self) -> Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._new()
        return session

    def existing(self) -> Session | None:
        """The calling thread's session, without making one."""
        return getattr(self._local, "session", None)

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._all)

    def _new(self) -> Session:
        with self._lock:
            primary, self._primary = self._primary, None
        session = self._make(primary)
        if primary is not None:
            weakref.finalize(session, self._give_back, primary)
        with self._lock:
            self._all.add(session)
        return session

    def _give_back(self, primary: Policy) -> None:
        with self._lock:
            self._primary = primary
