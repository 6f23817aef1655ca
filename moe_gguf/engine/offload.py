"""Where weights live: llama.cpp's ``--cpu-moe``, ``--n-cpu-moe N`` and ``-ot PATTERN=BUFFER``.

llama-cpp-python 0.3.36 leaves ``llama_model_params.tensor_buft_overrides`` unused; moe-gguf fills
the NULL-terminated C array itself and keeps it alive as long as the model.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from moe_gguf.errors import OffloadError

# the expert tensors of a MoE layer (llama.cpp common.h: LLM_FFN_EXPS_REGEX)
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"



class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(frozen=True)
class Placement:
    """Weight placement options, as llama.cpp users know them."""

    override_tensors: tuple[str, ...] = ()  # "PATTERN=BUFFER", e.g. r"blk\.1[0-9]\.ffn_.*_exps=CPU"
    cpu_moe: bool = False  # all expert weights in host memory
    n_cpu_moe: int = 0  # expert weights of the first N layers in host memory

    def rules(self, n_layer: int) -> list[tuple[str, str]]:
        """(regex, buffer type name) in the order llama.cpp applies them (first match wins)."""
        out: list[tuple[str, str]] = []
        for spec in self.override_tensors:
            for part in spec.split(","):
                if not part.strip():
                    continue
                pattern, sep, buft = part.rpartition("=")
                if not sep or not pattern or not buft:
                    raise OffloadError(f"override {part!r}: expected PATTERN=BUFFER, e.g. 'ffn_.*_exps=CPU'")
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise OffloadError(f"override {part!r}: invalid regular expression ({e})") from e
                out.append((pattern, buft.strip()))
        if self.n_cpu_moe < 0:
            raise OffloadError(f"--n-cpu-moe must be >= 0, got {self.n_cpu_moe}")
        if self.cpu_moe:
            out.append((EXPS_REGEX, "CPU"))
        else:
            out += [(rf"blk\.{il}{EXPS_REGEX}", "CPU") for il in range(min(self.n_cpu_moe, n_layer))]
        return out

    @property
    def active(self) -> bool:
        return bool(self.override_tensors or self.cpu_moe or self.n_cpu_moe)


def buffer_types() -> dict[str, int]:
    """Buffer type name -> ggml_backend_buffer_type_t of every device (and its host buffer type)."""
    from moe_gguf.engine import _ggml

    lib = _ggml.lib()
    out: dict[str, int] = {}
    for dev in _ggml.devices():
        for buft in (lib.ggml_backend_dev_buffer_type(dev), lib.ggml_backend_dev_host_buffer_type(dev)):
            if buft:
                out.setdefault(lib.ggml_backend_buft_name(buft).decode(), buft)
    return out


def gpu_devices() -> list[str]:
    """Names of this machine's GPU devices (llama_supports_gpu_offload is also true for a CPU build with the
    RPC backend, which moe-gguf always builds, so it cannot tell whether a GPU is here)."""
    from moe_gguf.engine import _ggml

    lib = _ggml.lib()
    return [_ggml.name(d) for d in _ggml.devices() if lib.ggml_backend_dev_type(d) in (_ggml.DEV_GPU, _ggml.DEV_IGPU)]


def override_array(rules: list[tuple[str, str]]) -> ctypes.Array | None:
    """The NULL-terminated llama_model_tensor_buft_override[] for ``rules`` (None if empty)."""
    if not rules:
        return None
    known = buffer_types()
    arr = (_Override * (len(rules) + 1))()
    for i, (pattern, name) in enumerate(rules):
        if name not in known:
            raise OffloadError(f"unknown buffer type {name!r} in override {pattern}={name}; "
                               f"this build has: {', '.join(sorted(known))}")
        arr[i].pattern = pattern.encode()
        arr[i].buft = known[name]
    return arr


_DEFAULTS_LOCK = threading.Lock()


@contextmanager
def model_params(**fields) -> Iterator[None]:
    """Make ``llama_cpp.Llama(...)`` load with extra llama_model_params fields.

    Llama builds its params from llama_model_default_params() inside __init__ and has no argument
    for these, so the defaults are swapped for the duration of the constructor.
    """
    from llama_cpp import llama_cpp as low

    if not fields:
        yield
        return
    with _DEFAULTS_LOCK:
        original = low.llama_model_default_params

        def patched():
            p = original()
            for k, v in fields.items():
                setattr(p, k, v)
            return p

        low.llama_model_default_params = patched
        try:
            yield
        finally:
            low.llama_model_default_params = original
