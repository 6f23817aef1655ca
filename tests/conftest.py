"""Shared fixtures: synthetic MoE GGUFs made once per session (seconds), the real patched library.

Test modules that need the patched llama.cpp say so with ``pytestmark = pytest.mark.native``; the rest (file
formats, profiles, ranking maths, datasets) run without it: ``pytest -m "not native"`` needs no native build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ARCHS = ("qwen3moe", "mixtral", "deepseek2", "gpt-oss")
DTYPES = ("f32", "q8_0")


@pytest.hookimpl(trylast=True)  # after -m has deselected: pure runs never load llama.cpp
def pytest_collection_modifyitems(config, items):
    if not any("native" in item.keywords for item in items):
        return  # pure tests only: llama.cpp is not loaded at all
    from moe_gguf.engine import _lib

    if not _lib.STATUS.ok:
        raise pytest.UsageError(f"these tests need the patched llama-cpp-python: {_lib.STATUS.error} "
                                "(or run only the pure tests: pytest -m 'not native')")
    gpu = _gpu_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU build of llama.cpp and a GPU"))


def _gpu_available() -> bool:
    from moe_gguf.engine.offload import gpu_devices

    return bool(gpu_devices())  # not llama_supports_gpu_offload: true for any build with the RPC backend


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


_cache: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="session")
def synth_model(model_dir):
    """synth_model(arch, dtype) -> path of a tiny synthetic model, written once per session."""
    from moe_gguf.formats.synth import PRESETS, write_gguf

    def make(arch: str, dtype: str = "f32") -> Path:
        key = (arch, dtype)
        if key not in _cache:
            _cache[key] = write_gguf(PRESETS[f"tiny-{arch}"], model_dir / f"tiny-{arch}-{dtype}.gguf", dtype=dtype)
        return _cache[key]

    return make


def write_dense_gguf(path: Path) -> Path:
    """A tiny dense (no experts) llama GGUF, which moe-gguf must refuse clearly."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
