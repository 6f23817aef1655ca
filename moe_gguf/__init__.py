"""moe-gguf: see and steer the experts a Mixture-of-Experts GGUF model routes each token through.

    from moe_gguf import MoEModel, SteeringProfile

    with MoEModel("model.gguf") as model:
        profile = SteeringProfile.for_model(model.topology).disable(12, 87)
        model.steer(profile)

The package is layered, data flowing one way (GGUF → topology → profile → graph inputs → decode → routing
records → scores → profile):

- ``moe_gguf.formats``: files and their data in pure Python (topology, profiles, routing records, GGUF writing);
- ``moe_gguf.engine``: the patched llama.cpp (models, contexts, offload, RPC);
- ``moe_gguf.study``: probe, rank and evaluate behaviour experts;
- ``moe_gguf.demo``: the shipped demo model and its dataset; ``moe_gguf.tui``: the chat UI; ``moe_gguf.cli``.

Importing ``moe_gguf`` loads no llama.cpp: the names below are imported on first use, and the engine loads the
patched library when a model is opened (``PatchMissingError`` names the fix if it is not installed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moe_gguf.errors import (
    ContextClosedError,
    DecodeError,
    ModelFileError,
    ModelMismatchError,
    ModelWeightsWarning,
    MoEGGUFError,
    NotMoEError,
    PatchMissingError,
    ProfileError,
)

__version__ = "0.2.0"

_LAZY = {
    "MoEModel": "moe_gguf.engine.model",
    "SteerContext": "moe_gguf.engine.context",
    "Request": "moe_gguf.engine.context",
    "Completion": "moe_gguf.engine.context",
    "StreamEvent": "moe_gguf.engine.context",
    "Placement": "moe_gguf.engine.offload",
    "ModelTopology": "moe_gguf.formats.topology",
    "SteeringProfile": "moe_gguf.formats.profile",
    "Schedule": "moe_gguf.formats.profile",
    "RoutingRecorder": "moe_gguf.formats.records",
    "RoutingRecord": "moe_gguf.formats.records",
}

__all__ = [
    "MoEModel", "SteerContext", "Request", "Completion", "StreamEvent", "Placement",
    "ModelTopology", "SteeringProfile", "Schedule", "RoutingRecorder", "RoutingRecord",
    "MoEGGUFError", "ModelFileError", "NotMoEError", "ProfileError", "ModelMismatchError", "ModelWeightsWarning",
    "PatchMissingError", "DecodeError", "ContextClosedError", "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_gguf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from moe_gguf.engine.context import Completion, Request, SteerContext, StreamEvent
    from moe_gguf.engine.model import MoEModel
    from moe_gguf.engine.offload import Placement
    from moe_gguf.formats.profile import Schedule, SteeringProfile
    from moe_gguf.formats.records import RoutingRecord, RoutingRecorder
    from moe_gguf.formats.topology import ModelTopology
