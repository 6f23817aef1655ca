"""The reproducible build: pinned sdist, patch application, cache key, import-time check."""

from __future__ import annotations

import pytest

from moe_gguf import native
from moe_gguf.engine import _lib


@pytest.mark.native
def test_loaded_library_carries_the_patch():
    assert _lib.STATUS.ok, _lib.STATUS.error
    assert _lib.STATUS.llama_cpp_version == native.LLAMA_CPP_PYTHON_VERSION
    assert "ok" in _lib.status_line()


def test_patch_that_does_not_apply_names_the_version(tmp_path):
    src = tmp_path / "src"
    (src / "vendor/llama.cpp/include").mkdir(parents=True)
    (src / "vendor/llama.cpp/include/llama.h").write_text("not the llama.h this patch expects\n")
    with pytest.raises(native.NativeBuildError, match=r"does not apply to llama-cpp-python 0\.3\.36"):
        native.apply_patch(src)


def test_cache_key_follows_patch_and_cmake_args(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    plain = native.build_key()
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert native.build_key() != plain
    assert native.cmake_args()[-1] == "-DGGML_CUDA=on"  # the user's args come last and win


def test_sdist_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_GGUF_CACHE", str(tmp_path))
    bad = tmp_path / "sdist" / f"llama_cpp_python-{native.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"tampered")
    with pytest.raises(native.NativeBuildError, match="sha256"):
        native.fetch_sdist(log=lambda *_: None)
    assert not bad.exists()  # removed, so the next build downloads it again


def test_build_key_follows_cmake_args_and_patch(monkeypatch, tmp_path):
    """A wheel built with other CMAKE_ARGS or another patch is never reused from the cache."""
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    plain = native.build_key()
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert native.build_key() != plain
    monkeypatch.delenv("CMAKE_ARGS")
    assert native.build_key() == plain
    patched = tmp_path / native.PATCH_NAME
    patched.write_bytes(native.patch_path().read_bytes() + b"\n")
    monkeypatch.setattr(native, "patch_dir", lambda: tmp_path)
    assert native.build_key() != plain


def test_patch_ships_inside_the_package():
    """pip install (not only a checkout) carries the patch: it is package data of moe_gguf._native."""
    from importlib.resources import files

    assert (files("moe_gguf._native") / native.PATCH_NAME).is_file()
    assert native.patch_path().read_bytes().startswith(b"diff --git")
