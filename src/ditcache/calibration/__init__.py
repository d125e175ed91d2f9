"""Offline calibration: profiles are JSON files tied to a model identity and a step count."""

from .profiles import Profile, ProfileMismatchError, model_fingerprint

__all__ = ["Profile", "ProfileMismatchError", "model_fingerprint"]
