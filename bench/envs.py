"""The two environments the benchmark compares: stock and patched llama-cpp-python 0.3.36, same CMAKE_ARGS.

stock:   bench/.stock-venv, a wheel built from the same verified sdist without the moe-gguf patch
         (cached under ~/.cache/moe-gguf/stock-wheels/<key>).
patched: the checkout's .venv when it holds the patched wheel for these CMAKE_ARGS, else
         bench/.patched-venv built from moe_gguf.native's cached wheel (the shared .venv is left alone).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from moe_gguf import native  # noqa: E402  (stdlib only: safe in any interpreter)

BENCH = ROOT / "bench"
STOCK_VENV = BENCH / ".stock-venv"
PATCHED_VENV = BENCH / ".patched-venv"
MAIN_VENV = ROOT / ".venv"
RUNTIME_DEPS = ["numpy", "diskcache", "jinja2", "typing-extensions"]
PATCHED_DEPS = RUNTIME_DEPS + ["gguf"]  # moe_gguf (on PYTHONPATH) reads GGUF metadata with it
MARKER = ".bench-wheel-key"


def stock_key() -> str:
    h = hashlib.sha256()
    for part in ("stock", native.LLAMA_CPP_PYTHON_VERSION, " ".join(native.cmake_args()), sys.platform, native._cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_stock_wheel(log=print) -> Path:
    """native.build_wheel() without the patch: same sdist, same CMAKE_ARGS, own cache."""
    out = native.cache_dir() / "stock-wheels" / stock_key()
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[0]
    sdist = native.fetch_sdist(log)
    with tempfile.TemporaryDirectory(prefix="moe-gguf-stock-") as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / f"llama_cpp_python-{native.LLAMA_CPP_PYTHON_VERSION}"
        env = dict(os.environ, CMAKE_ARGS=" ".join(native.cmake_args()))
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        log(f"building STOCK llama-cpp-python {native.LLAMA_CPP_PYTHON_VERSION}, CMAKE_ARGS={env['CMAKE_ARGS']!r} (minutes)")
        t0 = time.time()
        logfile = native.cache_dir() / "stock-build.log"
        with open(logfile, "w") as lf:
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", f"{tmp}/wheel", str(src)],
                               env=env, stdout=lf, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise native.NativeBuildError(f"stock wheel build failed, see {logfile}:\n{logfile.read_text()[-3000:]}")
        out.mkdir(parents=True, exist_ok=True)
        built = next(Path(tmp, "wheel").glob("llama_cpp_python-*.whl"))
        shutil.copy2(built, out / built.name)
        log(f"built in {time.time() - t0:.0f} s: {out / built.name}")
        return out / built.name


def _make_venv(venv: Path, wheel: Path, key: str, deps: list[str], log=print) -> Path:
    py = venv / "bin" / "python"
    marker = venv / MARKER
    if py.exists() and marker.exists() and marker.read_text().strip() == key:
        return py
    log(f"setting up {venv.relative_to(ROOT)} ({wheel.name}, key {key})")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + deps, check=True)
    subprocess.run(pip + ["--no-deps", "--force-reinstall", str(wheel)], check=True)
    marker.write_text(key)
    return py


def stock_python(log=print) -> Path:
    return _make_venv(STOCK_VENV, build_stock_wheel(log), stock_key(), RUNTIME_DEPS, log)


def patched_python(log=print) -> Path:
    key = native.build_key()
    marker = MAIN_VENV / ".moe-gguf-native-key"
    if marker.exists() and marker.read_text().strip() == key:
        return MAIN_VENV / "bin" / "python"
    return _make_venv(PATCHED_VENV, native.build_wheel(log), key, PATCHED_DEPS, log)


if __name__ == "__main__":
    print(stock_python(), patched_python())
