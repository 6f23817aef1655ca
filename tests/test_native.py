"""The reproducible build: pinned sdist, patch application, cache key, import-time check."""

from __future__ import annotations

import shutil

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


def _series(folder, patches):
    folder.mkdir()
    for name, text in patches.items():
        (folder / name).write_text(text)
    (folder / "series").write_text("# comment\n" + "\n".join(patches) + "\n")
    return folder


def _diff(path, old, new):
    return f"--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-{old}\n+{new}\n"


def test_series_applies_in_order_and_names_the_patch_that_does_not(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    folder = _series(tmp_path / "patches", {
        "0001-first.patch": _diff("a.txt", "one", "two"),
        "0002-second.patch": _diff("a.txt", "two", "three"),  # applies only after 0001
    })
    monkeypatch.setattr(native, "patch_dir", lambda: folder)
    assert [p.name for p in native.patch_series()] == ["0001-first.patch", "0002-second.patch"]
    native.apply_patch(src)
    assert (src / "a.txt").read_text() == "three\n"

    (src / "a.txt").write_text("one\n")
    (folder / "0002-second.patch").write_text(_diff("a.txt", "zero", "three"))
    with pytest.raises(native.NativeBuildError, match=r"0002-second\.patch does not apply to llama-cpp-python 0\.3\.36"):
        native.apply_patch(src)


def test_series_naming_a_missing_patch_is_refused(tmp_path, monkeypatch):
    folder = _series(tmp_path / "patches", {"0001-first.patch": _diff("a.txt", "one", "two")})
    (folder / "series").write_text("0001-first.patch\n0002-gone.patch\n")
    monkeypatch.setattr(native, "patch_dir", lambda: folder)
    with pytest.raises(native.NativeBuildError, match="0002-gone.patch"):
        native.build_key()


def test_shipped_series_lists_every_patch_in_the_folder():
    listed = [p.name for p in native.patch_series()]
    assert listed == sorted(p.name for p in native.patch_dir().glob("*.patch"))
    assert listed[0].startswith("0001-") and len(listed) >= 3


def test_cache_key_follows_every_patch(tmp_path, monkeypatch):
    folder = _series(tmp_path / "patches", {"0001-first.patch": _diff("a.txt", "one", "two"),
                                            "0002-second.patch": _diff("a.txt", "two", "three")})
    monkeypatch.setattr(native, "patch_dir", lambda: folder)
    key = native.build_key()
    (folder / "0002-second.patch").write_text(_diff("a.txt", "two", "four"))
    assert native.build_key() != key


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
    shutil.copytree(native.patch_dir(), tmp_path / "native", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(native, "patch_dir", lambda: tmp_path / "native")
    assert native.build_key() == plain  # the same series elsewhere
    last = native.patch_series()[-1]
    last.write_bytes(last.read_bytes() + b"\n")
    assert native.build_key() != plain


def test_patch_ships_inside_the_package():
    """pip install (not only a checkout) carries the patch: it is package data of moe_gguf._native."""
    from importlib.resources import files

    assert (files("moe_gguf._native") / "series").is_file()
    for patch in native.patch_series():
        assert (files("moe_gguf._native") / patch.name).is_file()
        assert b"\ndiff --git a/" in patch.read_bytes()
