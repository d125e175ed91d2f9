"""The policy interface. A policy decides, per forward and per block, whether to compute or reuse.

Subclasses override `forward` (whole-step decisions) and/or `block` (per-block decisions, only called when
`uses_block_hooks` is true). Per-branch state comes from `new_branch_state()` and is handed back in
`call.state`, so cond never reads uncond's cache; state shared across branches lives on the policy and is
cleared in `reset()`, which the engine calls at the start of every generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..adapters import ModelAdapter
from ..config import PolicyConfig
from ..engine.calls import BlockCall, ForwardCall, SubmoduleCall
from ..engine.state import BranchState

if TYPE_CHECKING:
    from ..engine.view import ModelView


class Policy:
    """Base of every method. The engine calls `forward(call)` for each model forward and, when
    `uses_block_hooks` / `uses_submodule_hooks` are set, `block(call)` / `submodule(call)` inside it; the
    defaults compute. Per-branch state is an instance of `branch_state` (a `BranchState` dataclass), made by
    `new_branch_state()` and handed back as `call.state`; cross-branch state lives on the policy and is
    cleared in `reset()` at the start of every generation. `model_view` (set by `bind`) says what model is
    cached. Register a policy for its config type with `@ditcache.register_policy(MyConfig)`; see
    docs/ENGINE.md, "Writing a policy".

    Class attributes (a policy may set them in `__init__` from its config): `branch_state`;
    `uses_block_hooks`, `uses_submodule_hooks` (attention / MLP submodules named by the adapter), read once
    when `apply` installs the engine; `couples_cfg_branches`, a declaration (True only where one CFG branch
    may use the other's outputs, as MixCache's CFG granularity does) that the contract tests rely on.

    Instance attributes: `config` (the frozen config), `adapter` (the model's `ModelAdapter`), `model_view`.

    Hooks to override: `forward(call: ForwardCall)`, `block(call: BlockCall)`, `submodule(call:
    SubmoduleCall)` (each returns what the hooked module returns); `reset()`; `on_nonfinite(call)` (a
    forward produced or stored NaN / inf: the engine has reset the branch's state, drop cross-branch state
    derived from it); `cached_tensors()` (tensors held outside the branch states, for stats' cache bytes).
    `describe()` names the policy and its config in stats.

    Example:
        >>> import dataclasses
        >>> import torch
        >>> import ditcache
        >>> from ditcache.engine import BranchState, sample_of
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> @dataclasses.dataclass(frozen=True)
        ... class OddStepsConfig(ditcache.PolicyConfig):  # reuse the previous output at every odd step
        ...     pass
        >>> @dataclasses.dataclass
        ... class LastOutput(BranchState):  # one per CFG branch; reset() restores the defaults
        ...     last: torch.Tensor | None = None
        >>> @ditcache.register_policy(OddStepsConfig)
        ... class OddStepsPolicy(ditcache.Policy):
        ...     branch_state = LastOutput
        ...     def forward(self, call):
        ...         if call.info.step % 2 and call.state.last is not None:
        ...             return call.reuse(call.state.last)
        ...         output = call.run()
        ...         call.state.last = call.store(sample_of(output))  # checked for NaN / inf
        ...         return output
        >>> model = tiny_model("flux")
        >>> handle = ditcache.apply(model, OddStepsConfig())
        >>> _ = euler_sample(model, "flux", tiny_inputs("flux"), steps=4, handle=handle)
        >>> [record.step for record in handle.records() if record.kind == "reused"]
        [1, 3]
        >>> handle.remove()
    """

    branch_state: type[BranchState] = BranchState
    uses_block_hooks: bool = False
    uses_submodule_hooks: bool = False  # attention / MLP submodules named by the adapter
    # What the method needs from a model's adapter (`ditcache.applicability.REQUIREMENTS`); () = any model.
    requires: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def requirements(cls, config: PolicyConfig) -> tuple[str, ...]:
        """The requirements of this config (override when they depend on it); checked by `apply`."""
        return cls.requires

    def __init__(self, config: PolicyConfig, adapter: ModelAdapter) -> None:
        self.config = config
        self.adapter = adapter
        self.model_view: ModelView | None = None

    # Set by policies whose design lets one CFG branch use the other's outputs (MixCache's CFG granularity
    # approximates uncond from cond); all others keep the branches fully isolated.
    couples_cfg_branches: bool = False

    def bind(self, model_view: ModelView) -> None:
        self.model_view = model_view

    def new_branch_state(self) -> BranchState:
        """A fresh state for one CFG branch (`branch_state`'s defaults)."""
        return self.branch_state()

    def reset(self) -> None:
        """Start of a generation: drop cross-branch state."""

    def cached_tensors(self) -> Any:
        """Tensors held outside the per-branch states (counted in stats' cache bytes)."""
        return None

    def forward(self, call: ForwardCall) -> Any:
        return call.run()

    def block(self, call: BlockCall) -> Any:
        return call.run()

    def submodule(self, call: SubmoduleCall) -> Any:
        return call.run()

    def on_nonfinite(self, call: ForwardCall) -> None:
        """A forward produced or stored NaN / inf: the engine has already reset the branch's state; drop any
        cross-branch state derived from it here."""

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items() if k != "policy")
        return f"{type(self.config).__name__}({fields})"


# Output minus input of one block, per carried tensor (None where the block returns None, SD3's last text).
Residuals = dict[str, "torch.Tensor | None"]


def calibrated_threshold(
    policy: Policy, call: ForwardCall, target_reuse: float, warmup: int, relative_to_warmup: bool = False
) -> Any:
    """The accumulate-and-reset threshold that reuses `target_reuse` of the steps on this model, from its
    calibration profile (method `policy.config.profile_method`, made by `ditcache.calibrate`); with
    `relative_to_warmup`, (threshold, the largest calibrated value of the warm-up steps 1..warmup-1)."""
    from ..calibration import thresholds
    from ..calibration.profiles import find_profile

    num_steps = call.info.num_steps
    method = policy.config.profile_method
    if num_steps is None:
        raise ValueError(
            f"{method} with target_reuse needs the number of steps: use a pipeline or handle.generation(num_steps=...)"
        )
    model = policy.model_view.model
    profile = find_profile(method, model, num_steps)
    profile.check(method, model, num_steps)
    threshold = thresholds.calibrated_threshold(profile.data, num_steps, target_reuse, warmup)
    if not relative_to_warmup:
        return threshold
    return threshold, thresholds.warmup_maximum(profile.data, warmup)
