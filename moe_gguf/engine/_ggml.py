"""ggml's device and backend-registry functions, typed once for ctypes.

llama-cpp-python 0.3.36 binds only llama_* functions; dlsym on its libllama handle also finds the ggml
symbols of the libraries it links, so they are declared here and shared by offload, rpc and the CLI.
"""

from __future__ import annotations

import ctypes

# ggml-backend.h: enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3

_VP, _SZ = ctypes.c_void_p, ctypes.c_size_t
_SIGNATURES = (
    ("ggml_backend_dev_count", [], _SZ),
    ("ggml_backend_dev_get", [_SZ], _VP),
    ("ggml_backend_dev_type", [_VP], ctypes.c_int),
    ("ggml_backend_dev_name", [_VP], ctypes.c_char_p),
    ("ggml_backend_dev_description", [_VP], ctypes.c_char_p),
    ("ggml_backend_dev_memory", [_VP, ctypes.POINTER(_SZ), ctypes.POINTER(_SZ)], None),
    ("ggml_backend_dev_buffer_type", [_VP], _VP),
    ("ggml_backend_dev_host_buffer_type", [_VP], _VP),
    ("ggml_backend_buft_name", [_VP], ctypes.c_char_p),
    ("ggml_backend_reg_by_name", [ctypes.c_char_p], _VP),
    ("ggml_backend_reg_get_proc_address", [_VP, ctypes.c_char_p], _VP),
    ("ggml_backend_reg_dev_count", [_VP], _SZ),
    ("ggml_backend_reg_dev_get", [_VP, _SZ], _VP),
)


def lib():
    """libllama's handle with the ggml functions above typed (AttributeError if a build lacks one)."""
    from llama_cpp import llama_cpp as low

    low.llama_backend_init()
    handle = low._lib
    if not getattr(handle, "_moe_gguf_ggml_typed", False):
        for name, args, res in _SIGNATURES:
            fn = getattr(handle, name)
            fn.argtypes, fn.restype = args, res
        handle._moe_gguf_ggml_typed = True
    return handle


def devices() -> list[int]:
    """Every registered device (ggml_backend_dev_t), in ggml's order."""
    g = lib()
    return [g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count())]


def name(dev: int) -> str:
    return lib().ggml_backend_dev_name(dev).decode(errors="replace")
