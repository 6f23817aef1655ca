"""Every error moe-gguf raises; its message says what is wrong, where, and how to fix it.

All derive from :class:`MoEGGUFError`, so ``except MoEGGUFError`` catches anything moe-gguf raises on
purpose. Each also derives from the builtin a caller would expect (bad input: ``ValueError``; failed I/O:
``OSError``; a missing build: ``ImportError``; a failed run: ``RuntimeError``).
"""

from __future__ import annotations


class MoEGGUFError(Exception):
    """Base of every error moe-gguf raises on purpose."""


# -- bad input: files and arguments --------------------------------------------------------------------


class ModelFileError(MoEGGUFError, ValueError):
    """A model file cannot be used: missing, not a GGUF, truncated or corrupted, or lacking metadata."""


class GGUFHeaderError(ModelFileError):
    """A truncated, damaged or unsupported GGUF header (the message names the file)."""


class NotMoEError(ModelFileError):
    """The model is valid but has no routed experts, so there is nothing to steer."""


class ProfileError(MoEGGUFError, ValueError):
    """A steering profile is malformed, or does not fit the model it is applied to."""


class ModelMismatchError(ProfileError):
    """The profile was made for a different model (its `model` fingerprint differs)."""


class ModelWeightsWarning(UserWarning):
    """A profile is applied to a model of the same shape with other router weights (e.g. a fine-tune)."""


class CountFileError(MoEGGUFError, ValueError):
    """A routing record or probe count file is missing, damaged, or not a moe-gguf file (the message names it)."""


class ProbeInputError(MoEGGUFError, ValueError):
    """A line of a study JSONL file (probe, rank, eval) is malformed; the message names file and line."""


class DemoSetupError(MoEGGUFError, ValueError):
    """The demo cannot run on the given model as asked (e.g. its context is too small); the message says how to fix it."""


class PruneError(MoEGGUFError, ValueError):
    """The model cannot be pruned as asked; the message names the reason and the fix."""


class OffloadError(MoEGGUFError, ValueError):
    """An override names an unknown buffer type or is not a valid pattern."""


class SteeringCallError(MoEGGUFError, ValueError):
    """The patched library refused a steering call (bad layer, expert, action or value)."""


# -- I/O -----------------------------------------------------------------------------------------------


class FileWriteError(MoEGGUFError, OSError, ValueError):
    """A file could not be written (disk full, no permission, ...); the previous file is left unchanged.

    Both an OSError (with the errno of the failure) and, like the other bad-input errors, a ValueError.
    """


class DemoModelMissingError(MoEGGUFError, FileNotFoundError):
    """The shipped demo model file is not where the package expects it."""


# -- the native library and running it ------------------------------------------------------------------


class PatchMissingError(MoEGGUFError, ImportError):
    """The loaded llama-cpp-python is not the patched build moe-gguf needs."""


class NativeBuildError(MoEGGUFError, RuntimeError):
    """The patched llama-cpp-python could not be built or installed."""


class DecodeError(MoEGGUFError, RuntimeError):
    """llama_decode failed (context full, allocation failure, ...)."""


class ContextClosedError(MoEGGUFError, RuntimeError):
    """A context (or the model it was made on) was closed and cannot be used any more."""


class RPCError(MoEGGUFError, RuntimeError):
    """An RPC server cannot be used: bad endpoint, unreachable, or a library built without RPC."""
