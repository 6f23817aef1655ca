"""What `pip install <checkout>` installs: every module, the patch as package data, the UI inside the package.

The wheel is built from this checkout (no network: the dev environment's setuptools, no build isolation) and
installed into a temporary folder, then used from another working directory, as a user's install would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy of the files git knows (what a clean clone has), so no stale build/ folder leaks in
    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("moe_gguf-*.whl")
    return path


def _source_files() -> set[str]:
    """Installed names of the files a user needs: package modules, the UI, its stylesheets, the patch series."""
    names = set()
    for folder, prefix in ((ROOT / "moe_gguf", "moe_gguf"), (ROOT / "tui", "moe_gguf/tui"),
                           (ROOT / "native", "moe_gguf/_native")):
        for f in folder.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                names.add(f"{prefix}/{f.relative_to(folder).as_posix()}")
    return names


def test_wheel_holds_every_module_and_the_patch_and_no_top_level_tui(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _source_files() - names
    assert not missing, f"not installed: {sorted(missing)}"
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("moe_gguf-")}
    assert tops == {"moe_gguf"}, tops  # never a bare `tui` or `native` package in site-packages
    assert any(n.startswith("moe_gguf/_native/") and n.endswith(".patch") for n in names)


def test_installed_package_imports_without_llama_cpp_and_finds_its_patch(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    code = """
import sys
import moe_gguf
from moe_gguf import SteeringProfile, ModelTopology, native
assert "llama_cpp" not in sys.modules, "importing the public API loaded llama.cpp"
path = native.patch_path()
assert str(path).startswith(sys.argv[1]), path
print(moe_gguf.__version__, SteeringProfile.__module__, ModelTopology.__module__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # not the checkout: nothing may come from the source tree
    r = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "moe_gguf.formats.profile moe_gguf.formats.topology" in r.stdout
    r = subprocess.run([sys.executable, "-m", "moe_gguf", "--help"], cwd=elsewhere, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "probe" in r.stdout and "chat" in r.stdout, r.stderr[-2000:]
