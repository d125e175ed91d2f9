"""Calibration profiles: plain JSON, tied to the model they were measured on and the step count.

The model identity is a fingerprint of the class, its config and a sample of its weights, so a profile
made for another model (or another checkpoint of the same architecture) is refused with a clear error.
Profiles are never pickled. `find_profile` looks in the user profile directory (`user_profile_dir()`:
$DITCACHE_PROFILE_DIR, else ~/.cache/ditcache/profiles or $XDG_CACHE_HOME/ditcache/profiles), where
`ditcache.calibrate` saves, then in the profiles shipped with the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import schemas  # noqa: F401  (registers the shipped methods' profile schemas)
from .validate import InvalidProfileError, validate_blocks, validate_header, validate_profile

PROFILE_DIR = Path(__file__).parent / "profiles"
PROFILE_DIR_ENV = "DITCACHE_PROFILE_DIR"  # overrides the user profile directory


class ProfileMismatchError(ValueError):
    """A profile was made for another model or another number of steps."""


def model_fingerprint(model: torch.nn.Module) -> str:
    config = getattr(model, "config", {})
    digest = hashlib.sha256(type(model).__name__.encode())
    # Private keys (diffusers' `_use_default_values` is a list in set order) would change between processes.
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Up to 1024 values spread over every tensor: cheap on large models, yet any retraining or
            # other random initialisation changes it (norm weights alone would not).
            flat = param.detach().flatten()
            digest.update(name.encode())
            digest.update(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class Profile:
    method: str
    model_name: str  # human-readable ("ref-image" or the class name)
    fingerprint: str
    num_steps: int
    data: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        return path

    # Where the profile was read from, named in validation errors (not saved: set by `load`).
    source: ClassVar[str] = "<profile in memory>"

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read and validate a profile (header and the method's data schema): a malformed or tampered file
        raises `InvalidProfileError` naming the file and the field."""
        profile = cls.read(path)
        profile.validate()
        return profile

    @classmethod
    def read(cls, path: str | Path) -> Profile:
        """Read a profile and check its header only (method, model, fingerprint, steps); `validate()` checks
        the data. `find_profile` reads every candidate this way and validates the one it returns."""
        text = Path(path).read_text()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidProfileError(str(path), "<json>", f"is not valid JSON ({error})") from None
        validate_header(raw, str(path))
        profile = cls(**{f.name: raw[f.name] for f in dataclasses.fields(Profile)})
        profile.source = str(path)
        return profile

    def validate(self) -> None:
        """The method's data schema (types, ranges, finite values, per-step lengths): `InvalidProfileError`."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Profile)}
        validate_profile(fields, self.source)

    @classmethod
    def shipped(cls, method: str, model_name: str, num_steps: int) -> Profile:
        path = PROFILE_DIR / f"{method}-{model_name}-{num_steps}.json"
        if not path.exists():
            have = sorted(p.stem for p in PROFILE_DIR.glob(f"{method}-*.json"))
            raise FileNotFoundError(
                f"no shipped {method} profile for {model_name} at {num_steps} steps (shipped: {have or 'none'}); "
                f"make one with `ditcache calibrate {method} --model {model_name} --steps {num_steps}`"
            )
        return cls.load(path)

    def check(self, method: str, model: torch.nn.Module, num_steps: int | None) -> None:
        if self.method != method:
            raise ProfileMismatchError(f"profile is for {self.method!r}, not {method!r}")
        fingerprint = model_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise ProfileMismatchError(
                f"profile was calibrated on another model ({self.model_name}, fingerprint {self.fingerprint}); "
                f"this {type(model).__name__} has fingerprint {fingerprint}: calibrate it first"
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise ProfileMismatchError(
                f"profile was calibrated for {self.num_steps} steps but this generation has {num_steps}; "
                f"calibrate for {num_steps} steps or sample with {self.num_steps}"
            )
        self.validate()
        num_blocks = _num_blocks(model)
        if num_blocks is not None:
            validate_blocks(self.method, self.data, self.source, num_blocks)


def _num_blocks(model: torch.nn.Module) -> int | None:
    """The number of blocks the model's adapter hooks (None for a model without an adapter)."""
    from ..adapters import adapter_for

    try:
        adapter = adapter_for(model)
    except (TypeError, ValueError, KeyError):
        return None
    return sum(len(getattr(model, spec.attr, ())) for spec in adapter.block_lists)


def user_profile_dir() -> Path:
    """Where calibrated profiles are saved and looked up first: $DITCACHE_PROFILE_DIR when set, else
    `ditcache/profiles` under the user's cache directory ($XDG_CACHE_HOME, default ~/.cache)."""
    override = os.environ.get(PROFILE_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(cache).expanduser() / "ditcache" / "profiles"


def profile_dirs() -> list[Path]:
    """Where `find_profile` looks, in order: the user profile directory, then the shipped profiles."""
    return [user_profile_dir(), PROFILE_DIR]


def save_user_profile(profile: Profile) -> Path:
    """Save `profile` in the user profile directory under a name unique per method, model and step count."""
    name = f"{profile.method}-{profile.model_name}-{profile.fingerprint}-{profile.num_steps}.json"
    return profile.save(user_profile_dir() / name)


def find_profile(method: str, model: torch.nn.Module, num_steps: int, directory: str | Path | None = None) -> Profile:
    """The profile of `method` made for this very model (fingerprint) and step count, from `directory` or, by
    default, from `profile_dirs()` ($DITCACHE_PROFILE_DIR first, then the shipped profiles); first match wins."""
    fingerprint = model_fingerprint(model)
    dirs = [Path(directory)] if directory is not None else profile_dirs()
    searched = []
    for folder in dirs:
        found = []
        for path in sorted(folder.glob(f"{method}-*.json")):
            try:
                profile = Profile.read(path)
            except (ValueError, TypeError, OSError) as error:  # one unreadable file must not hide the others
                warnings.warn(f"skipping unreadable profile {path}: {error}", stacklevel=2)
                continue
            if profile.method != method:  # "omnicache-*.json" also matches another method's files
                continue
            found.append(f"{profile.model_name}@{profile.num_steps}")
            if profile.fingerprint == fingerprint and profile.num_steps == num_steps:
                profile.validate()  # this model's own profile, tampered with: say so rather than skip it
                return profile
        what = ", ".join(found) if found else ("none" if folder.is_dir() else "no such directory")
        searched.append(f"{folder} ({what})")
    raise ProfileMismatchError(
        f"no {method} profile for this {type(model).__name__} (fingerprint {fingerprint}) at {num_steps} steps; "
        f"searched: {'; '.join(searched)}. Make one with `ditcache.calibrate(pipe_or_model, {method!r}, "
        f"num_steps={num_steps}, ...)` (or `ditcache calibrate {method} --model ref-... --steps {num_steps}` for a "
        f"reference model): it is saved in {user_profile_dir()} and found from then on"
    )
