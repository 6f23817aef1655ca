"""Routing read the stock way: llama.cpp's ``cb_eval`` graph callback on ``ffn_moe_topk-<layer>``.

moe-gguf's own capture (``llama_moe_set_route_callback``) is cheaper; this module exists as an
independent reference for tests and as the baseline the benchmarks compare against. ``cb_eval``
splits the graph at every tensor it asks for and synchronises there, which is why it is slow.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable

import numpy as np

GGML_MAX_DIMS = 4
GGML_TYPE_I32 = 26


class _TensorHead(ctypes.Structure):
    # the leading fields of struct ggml_tensor (ggml.h), enough to read shape and strides
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ]


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for pattern in ("libggml-base.so*", "libggml-base.dylib", "ggml-base.dll"):
        found = sorted(glob.glob(os.path.join(libdir, pattern)))
        if found:
            lib = ctypes.CDLL(found[0])
            break
    else:
        raise OSError(f"libggml-base not found in {libdir}")
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def read_i32(lib: ctypes.CDLL, t: int) -> np.ndarray:
    """A (possibly strided) I32 tensor as a packed [ne1, ne0] array.

    ``ffn_moe_topk`` is a view of the argsort with row stride n_expert: read ggml_nbytes() bytes
    from its start (not ne0*ne1*4 from a packed layout) and apply the strides.
    """
    head = _TensorHead.from_address(t)
    raw = np.empty(lib.ggml_nbytes(t), dtype=np.uint8)
    lib.ggml_backend_tensor_get(t, raw.ctypes.data, 0, raw.nbytes)
    ne0, ne1 = head.ne[0], head.ne[1]
    view = np.lib.stride_tricks.as_strided(raw.view(np.int32), shape=(ne1, ne0), strides=(head.nb[1], head.nb[0]))
    return view.copy()


class TopkTap:
    """A cb_eval callback collecting ``ffn_moe_topk-<layer>`` per graph evaluation.

    Pass ``tap.callback`` as the context's ``cb_eval``; ``tap.topk[layer]`` is a list of
    [n_tokens, n_expert_used] arrays, one per ubatch.
    """

    def __init__(self, on_topk: Callable[[int, np.ndarray], None] | None = None) -> None:
        from llama_cpp import llama_cpp as low

        self._lib = _ggml()
        self.topk: dict[int, list[np.ndarray]] = {}
        self.n_asked = 0  # graph nodes offered to the callback: a measure of graph size
        self._on_topk = on_topk
        self.callback = low.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t: int, ask: bool, _user: int) -> bool:
        self.n_asked += ask
        name = self._lib.ggml_get_name(t) or b""
        if not name.startswith(b"ffn_moe_topk-"):
            return False if ask else True
        if ask:
            return True
        layer = int(name.split(b"-")[1])
        ids = read_i32(self._lib, t)
        self.topk.setdefault(layer, []).append(ids)
        if self._on_topk:
            self._on_topk(layer, ids)
        return True

    def counts(self, n_layer: int, n_expert: int) -> np.ndarray:
        out = np.zeros((n_layer, n_expert), dtype=np.int64)
        for layer, chunks in self.topk.items():
            for ids in chunks:
                out[layer] += np.bincount(ids.ravel(), minlength=n_expert)
        return out
