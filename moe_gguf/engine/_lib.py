"""ctypes bindings for the moe-gguf patch of llama.cpp (see native/ and llama.h's llama_moe_*).

The patched symbols live in the same libllama that llama-cpp-python loads, so llama-cpp-python's
objects (models, contexts) are used as they are.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from moe_gguf.errors import PatchMissingError, SteeringCallError
from moe_gguf.native import FIX_COMMAND, LLAMA_CPP_PYTHON_VERSION, PATCH_API_VERSION

# enum llama_moe_err -> what went wrong (the C side also logs the details)
ERRORS = {
    -1: "invalid argument (context, profile or sequence id)",
    -2: "not a MoE model or not a MoE layer",
    -3: "layer index out of range",
    -4: "vector length is not the model's number of experts",
    -5: "unknown steering action",
    -6: "bias and scale must be finite numbers",
    -7: "more forced experts in a layer than experts used per token (or expert groups)",
    -8: "too many disabled experts: fewer left than experts used per token",
}


class llama_moe_route(ctypes.Structure):
    _fields_ = [
        ("il", ctypes.c_int32),
        ("router", ctypes.c_int32),  # 0: the layer's first top-k selection, 1: its second (grovemoe's chunk experts)
        ("n_tokens", ctypes.c_int32),
        ("n_expert", ctypes.c_int32),
        ("n_expert_used", ctypes.c_int32),
        ("ids", ctypes.POINTER(ctypes.c_int32)),
        ("weights", ctypes.POINTER(ctypes.c_float)),
        ("probs", ctypes.POINTER(ctypes.c_float)),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
    ]


ROUTE_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.POINTER(llama_moe_route), ctypes.c_void_p)


@dataclass(frozen=True)
class PatchStatus:
    llama_cpp_version: str | None
    api_version: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _probe() -> tuple[ctypes.CDLL | None, PatchStatus]:
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as low
    except Exception as e:  # ImportError, or OSError from a broken shared library
        return None, PatchStatus(None, None, f"llama-cpp-python is not importable ({e}); run: {FIX_COMMAND}")
    version = getattr(llama_cpp, "__version__", None)
    lib = low._lib
    if not hasattr(lib, "llama_moe_steer_api_version"):
        return None, PatchStatus(
            version, None,
            f"llama-cpp-python {version} is installed without the moe-gguf patch; run: {FIX_COMMAND}",
        )
    lib.llama_moe_steer_api_version.argtypes = []
    lib.llama_moe_steer_api_version.restype = ctypes.c_int32
    api = int(lib.llama_moe_steer_api_version())
    if version != LLAMA_CPP_PYTHON_VERSION or api != PATCH_API_VERSION:
        return None, PatchStatus(
            version, api,
            f"installed llama-cpp-python {version} with moe-gguf patch API {api}; this moe-gguf needs "
            f"{LLAMA_CPP_PYTHON_VERSION} with API {PATCH_API_VERSION}; run: {FIX_COMMAND}",
        )
    return lib, PatchStatus(version, api, None)


_loaded: tuple[ctypes.CDLL | None, PatchStatus] | None = None


def _load() -> tuple[ctypes.CDLL | None, PatchStatus]:
    """Import llama-cpp-python and check its patch, once, on first use (importing moe-gguf loads nothing)."""
    global _loaded
    if _loaded is None:
        lib_, status = _probe()
        if lib_ is not None:
            _declare(lib_)
        _loaded = (lib_, status)
    return _loaded


def __getattr__(name: str):
    if name == "STATUS":  # _lib.STATUS: the patch status, probed on first access
        return _load()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def status() -> PatchStatus:
    """Whether the patched llama-cpp-python is installed (imports it on first call)."""
    return _load()[1]


def status_line() -> str:
    st = status()
    if st.ok:
        return f"llama-cpp-python {st.llama_cpp_version}: moe-gguf patch API {st.api_version} (ok)"
    return f"not ready: {st.error}"


def lib() -> ctypes.CDLL:
    """The patched libllama; raises PatchMissingError with the fixing command otherwise."""
    lib_, st = _load()
    if lib_ is None:
        raise PatchMissingError(st.error)
    return lib_


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    f32p = ctypes.POINTER(ctypes.c_float)
    i32p = ctypes.POINTER(ctypes.c_int32)
    lib.llama_moe_steer_set_layer.argtypes = [p, ctypes.c_int32, ctypes.c_int32, i32p, f32p, f32p, ctypes.c_int32]
    lib.llama_moe_steer_set_layer.restype = ctypes.c_int32
    lib.llama_moe_steer_clear.argtypes = [p, ctypes.c_int32]
    lib.llama_moe_steer_clear.restype = ctypes.c_int32
    lib.llama_moe_steer_seq.argtypes = [p, ctypes.c_int32, ctypes.c_int32]
    lib.llama_moe_steer_seq.restype = ctypes.c_int32
    lib.llama_moe_set_route_callback.argtypes = [p, ROUTE_CALLBACK, p, ctypes.c_bool]
    lib.llama_moe_set_route_callback.restype = ctypes.c_int32
    lib.llama_moe_set_n_expert_used.argtypes = [p, ctypes.c_int32, ctypes.c_int32]
    lib.llama_moe_set_n_expert_used.restype = ctypes.c_int32
    lib.llama_moe_get_n_expert_used.argtypes = [p, ctypes.c_int32]
    lib.llama_moe_get_n_expert_used.restype = ctypes.c_int32




def check(rc: int, what: str) -> None:
    if rc != 0:
        raise SteeringCallError(f"{what}: {ERRORS.get(rc, f'error {rc}')}")
