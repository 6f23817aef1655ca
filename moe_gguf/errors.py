"""Errors moe-gguf raises for bad input; their messages say what is wrong, where, and how to fix it.

All are ValueErrors, so callers that only care about "bad input" can catch that.
"""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file cannot be used: missing, not a GGUF, truncated or corrupted, or lacking metadata."""


class NotMoEError(ModelFileError):
    """The model is valid but has no routed experts, so there is nothing to steer."""


class ProfileError(ValueError):
    """A steering profile is malformed, or does not fit the model it is applied to."""


class ModelMismatchError(ProfileError):
    """The profile was made for a different model (its `model` fingerprint differs)."""


class FileWriteError(OSError, ValueError):
    """A file could not be written (disk full, no permission, ...); the previous file is left unchanged.

    Both an OSError (with the errno of the failure) and, like the other moe-gguf errors, a ValueError.
    """


class CountFileError(ValueError):
    """A routing record or probe count file is missing, damaged, or not a moe-gguf file (the message names it)."""
