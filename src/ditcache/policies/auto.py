"""`auto`: the config `ditcache.tune` picked for this very model at a requested speedup.

`ditcache.tune(pipe, speedup=2, num_steps=50, prompts=[...])` measures every candidate config (presets and a
grid of knobs) on one generation of the model and saves the winner in an "auto" profile (one file per model,
step count and speedup). `ditcache.apply(pipe, "auto:speedup=2")` finds that profile by the model's
fingerprint, like calibration profiles (the user profile directory first, then the shipped profiles), and
applies the winner.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import PolicyConfig, check_float, check_int
from ..registry import register_preset

METHOD = "auto"


@dataclasses.dataclass(frozen=True)
class AutoConfig(PolicyConfig):
    r"""
    The best config for this model at a requested speedup, picked by `ditcache.tune` and looked up at `apply`.

    `ditcache.tune(pipe_or_model, speedup=..., num_steps=..., ...)` runs one generation of the model uncached
    and then with every candidate config (every preset and a grid of knobs), and picks the one with the best
    PSNR of the final latent among those whose MACs speedup reaches `speedup`; it saves the winner in an
    "auto" profile tied to the model (fingerprint), the step count and the speedup. Applying `AutoConfig`
    (preset `auto`, e.g. `"auto:speedup=2"`) finds that profile, in the user profile directory and then in
    the shipped profiles, and applies the winner: `handle.config` is the winner's config. Without a tuned
    profile, `apply` raises `ProfileMismatchError` (a `ValueError`) naming the `ditcache.tune` call and the
    `ditcache tune` command that make one.

    Args:
        speedup (`float`, defaults to `2.0`):
            The MACs speedup the profile was tuned for, > 1 (a number given to `ditcache.tune(speedup=...)`).
        num_steps (`int`, *optional*, defaults to `None`):
            The step count the profile was tuned for, >= 2. `None`: the one tuned step count, or any when
            every tuned step count picked the same config (several different ones raise, listing them).

    Example:
        >>> import ditcache
        >>> from ditcache.testing import euler_sample, tiny_inputs, tiny_model
        >>> model, inputs = tiny_model("flux", seed=5), tiny_inputs("flux")
        >>> run = lambda handle: euler_sample(model, "flux", inputs, 8, handle=handle)
        >>> result = ditcache.tune(model, speedup=1.5, num_steps=8, run=run, candidates=["fora-2", "fora-3"])
        >>> result.spec, result.winner.macs_speedup >= 1.5  # the best PSNR among those reaching 1.5x
        ('fora-2', True)
        >>> handle = ditcache.apply(model, "auto:speedup=1.5")  # the tuned winner for this model
        >>> handle.config == ditcache.preset("fora-2")
        True
        >>> handle.remove()
        >>> ditcache.apply(model, "auto:speedup=3")
        Traceback (most recent call last):
        ...
        ditcache.calibration.profiles.ProfileMismatchError: no tuned 'auto' profile ...ditcache.tune(pipe, speedup=3,...
    """

    profile_method: ClassVar[str] = METHOD  # made by ditcache.tune; tests write tiny ones
    speedup: float = 2.0
    num_steps: int | None = None

    def __post_init__(self) -> None:
        check_float("speedup", self.speedup, 1.0, 100.0, low_open=True)
        if self.num_steps is not None:
            check_int("num_steps", self.num_steps, 2)

    def resolve(self, model: Any) -> PolicyConfig:
        """The winner config of the tuned "auto" profile of `model` at this speedup (and step count)."""
        from ..registry import config_from_dict

        tuned = tuned_profiles(model, self.speedup, self.num_steps)
        configs = {steps: profile.data["config"] for steps, profile in sorted(tuned.items())}
        if len({repr(c) for c in configs.values()}) > 1:
            listed = "; ".join(f"{steps} steps: {tuned[steps].data.get('spec', c)}" for steps, c in configs.items())
            raise ValueError(
                f"'auto' at speedup {self.speedup:g}x is tuned for several step counts with different winners "
                f"({listed}); give the step count: 'auto:speedup={self.speedup:g}:num_steps={min(configs)}'"
            )
        return config_from_dict(next(iter(configs.values())))


def speedup_text(speedup: float) -> str:
    return f"{speedup:g}"


def auto_profile_name(model_name: str, fingerprint: str, num_steps: int, speedup: float) -> str:
    """One file per model, step count and speedup."""
    return f"{METHOD}-{model_name}-{fingerprint}-{num_steps}-x{speedup_text(speedup)}.json"


def tuned_profiles(model: torch.nn.Module, speedup: float, num_steps: int | None = None) -> dict[int, Any]:
    """The "auto" profiles of this model (fingerprint) tuned at `speedup` (and `num_steps` when given), by step
    count; searched like `find_profile`: the user profile directory first, then the shipped profiles, the first
    file per step count wins. None: `ProfileMismatchError` naming the tune call and command."""
    from ..calibration.profiles import Profile, ProfileMismatchError, model_fingerprint, profile_dirs

    fingerprint = model_fingerprint(model)
    found: dict[int, Profile] = {}
    searched = []
    for folder in profile_dirs():
        seen = []
        for path in sorted(Path(folder).glob(f"{METHOD}-*.json")):
            try:
                profile = Profile.load(path)
            except (ValueError, TypeError, OSError) as error:  # one unreadable file must not hide the others
                warnings.warn(f"skipping unreadable profile {path}: {error}", stacklevel=2)
                continue
            tuned_for = profile.data.get("speedup") if isinstance(profile.data, dict) else None
            if profile.method != METHOD or not isinstance(tuned_for, (int, float)):
                continue
            seen.append(f"{profile.model_name}@{profile.num_steps}x{speedup_text(tuned_for)}")
            if (
                profile.fingerprint == fingerprint
                and math.isclose(tuned_for, speedup, rel_tol=1e-9)
                and (num_steps is None or profile.num_steps == num_steps)
            ):
                found.setdefault(profile.num_steps, profile)
        what = ", ".join(seen) if seen else ("none" if Path(folder).is_dir() else "no such directory")
        searched.append(f"{folder} ({what})")
    if found:
        return found
    steps = num_steps if num_steps is not None else "N"
    at_steps = f" at {num_steps} steps" if num_steps is not None else ""
    raise ProfileMismatchError(
        f"no tuned 'auto' profile for this {type(model).__name__} (fingerprint {fingerprint}) at speedup "
        f"{speedup_text(speedup)}x{at_steps}; searched: {'; '.join(searched)}. Tune it first: "
        f"`ditcache.tune(pipe, speedup={speedup_text(speedup)}, num_steps={steps}, prompts=[...])` (or "
        f"run=<callable> for a bare model), or on the command line `ditcache tune --pipeline ... --prompts "
        f"prompts.txt --steps {steps} --speedup {speedup_text(speedup)}`"
    )


register_preset(
    "auto",
    AutoConfig,
    "the config ditcache.tune picked for this model at a speedup (auto:speedup=2; tune first)",
)
