"""Build and install the patched llama-cpp-python that moe-gguf runs on.

    python -m moe_gguf.native build     # download, verify, patch, build, install (cached)
    python -m moe_gguf.native status    # is the loaded library patched?

The patches are a series (quilt style) in the patch folder (:func:`patch_dir`): ``series`` lists them, one a
line, applied in that order to the sdist (``vendor/llama.cpp`` and ``llama_cpp``).
The wheel is cached under ``$MOE_GGUF_CACHE`` (default ``~/.cache/moe-gguf``) keyed by the
llama-cpp-python version, the hashes of ``series`` and of every patch, and ``CMAKE_ARGS``, so a second setup
only reinstalls it.
``CMAKE_ARGS`` is honoured as llama-cpp-python does (``-DGGML_CUDA=on``, ``-DGGML_METAL=on``,
``-DGGML_VULKAN=on``, ``-DGGML_RPC=on``...).
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

from moe_gguf.errors import NativeBuildError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH_API_VERSION = 3  # LLAMA_MOE_STEER_API_VERSION in the patched llama.h

# -DLLAVA_BUILD=OFF: what moe-gguf does not need; -DGGML_RPC=ON: llama.cpp's RPC backend, for models spread
# over several machines (moe_gguf.engine.rpc). CMAKE_ARGS given by the user come after and win.
DEFAULT_CMAKE_ARGS = ["-DLLAVA_BUILD=OFF", "-DGGML_RPC=ON"]

FIX_COMMAND = "python -m moe_gguf.native build"



def cache_dir() -> Path:
    return Path(os.environ.get("MOE_GGUF_CACHE", Path.home() / ".cache" / "moe-gguf"))


def patch_dir() -> Path:
    """The folder of the llama.cpp patch series (``series`` and the patches it lists): the repo's native/,
    installed as the package data moe_gguf._native."""
    from importlib.resources import files

    try:
        folder = Path(str(files("moe_gguf._native")))
    except ModuleNotFoundError:  # a source tree not installed: moe_gguf/ beside native/
        folder = Path(__file__).resolve().parent.parent / "native"
    return folder


def patch_series() -> list[Path]:
    """The patches named in ``series``, in order (``#`` starts a comment; a name may be followed by options)."""
    folder = patch_dir()
    series = folder / "series"
    if not series.is_file():
        raise NativeBuildError(f"patch series not found: {series}; reinstall moe-gguf (pip install <checkout or wheel>), "
                               "whose package data moe_gguf._native holds it")
    patches = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip().split(maxsplit=1)
        if not name:
            continue
        patch = folder / name[0]
        if not patch.is_file():
            raise NativeBuildError(f"{series} lists {name[0]}, which is not in {folder}")
        patches.append(patch)
    if not patches:
        raise NativeBuildError(f"{series} lists no patch")
    return patches


def cmake_args() -> list[str]:
    return DEFAULT_CMAKE_ARGS + os.environ.get("CMAKE_ARGS", "").split()


def build_key() -> str:
    h = hashlib.sha256()
    h.update(LLAMA_CPP_PYTHON_VERSION.encode())
    patches = patch_series()
    h.update((patch_dir() / "series").read_bytes())
    for patch in patches:
        h.update(patch.name.encode())
        h.update(patch.read_bytes())
    h.update(" ".join(cmake_args()).encode())
    h.update(sys.platform.encode())
    # the default build is -march=native: a wheel is only reusable on a CPU with the same features
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(log=print) -> Path:
    """The pinned sdist from the package index, verified by sha256."""
    dest = cache_dir() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (sdist)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not sdist.exists():
            raise NativeBuildError(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist:\n{r.stderr[-2000:]}")
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        sdist.unlink()
        raise NativeBuildError(
            f"{sdist.name}: sha256 {digest} does not match the pinned {SDIST_SHA256}; the file was removed, run the build again"
        )
    return sdist


def apply_patch(src: Path) -> None:
    """Apply every patch of the series to the extracted sdist in ``src``, in order, each one checked by a dry
    run first; the first that does not apply stops the build, named."""
    tools = [
        (["patch", "-p1", "--forward", "--batch", "--dry-run", "-i"], ["patch", "-p1", "--forward", "--batch", "-i"]),
        (["git", "apply", "--check"], ["git", "apply"]),
    ]
    tool = next(((dry, cmd) for dry, cmd in tools if shutil.which(cmd[0])), None)
    if tool is None:
        raise NativeBuildError("neither `patch` nor `git` is installed: install one of them to apply the llama.cpp patches")
    dry, cmd = tool
    for patch in patch_series():
        r = subprocess.run([*dry, str(patch)], cwd=src, capture_output=True, text=True)
        if r.returncode != 0:
            raise NativeBuildError(
                f"the moe-gguf patch {patch.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
                f"in {src}:\n{(r.stdout + r.stderr)[-2000:]}\n"
                f"moe-gguf supports exactly llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (the pinned sdist); "
                f"rebuild with `{FIX_COMMAND}`."
            )
        r = subprocess.run([*cmd, str(patch)], cwd=src, capture_output=True, text=True)
        if r.returncode != 0:
            raise NativeBuildError(f"applying the moe-gguf patch {patch.name} failed in {src}:\n{(r.stdout + r.stderr)[-2000:]}")


def build_wheel(log=print) -> Path:
    """Build (or take from the cache) the patched wheel; returns its path."""
    out = cache_dir() / "wheels" / build_key()
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if wheels:
        log(f"cached patched wheel: {wheels[0]}")
        return wheels[0]
    sdist = fetch_sdist(log)
    with tempfile.TemporaryDirectory(prefix="moe-gguf-build-") as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(tmp)
        src = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        apply_patch(src)
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(cmake_args())
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        log(f"building patched llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} with CMAKE_ARGS={env['CMAKE_ARGS']!r} "
            f"({env['CMAKE_BUILD_PARALLEL_LEVEL']} jobs; a few minutes)")
        t0 = time.time()
        tmp_out = Path(tmp) / "wheel"
        logfile = cache_dir() / "build.log"
        with open(logfile, "w") as lf:
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_out), str(src)],
                               env=env, stdout=lf, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise NativeBuildError(f"building the patched wheel failed (full log: {logfile}):\n{tail}")
        out.mkdir(parents=True, exist_ok=True)
        built = next(tmp_out.glob("llama_cpp_python-*.whl"))
        dest = out / built.name
        shutil.copy2(built, dest)
        log(f"built in {time.time() - t0:.0f} s: {dest}")
        return dest


def needs_rebuild() -> bool:
    """True if the installed llama-cpp-python is not the wheel this checkout's patch and CMAKE_ARGS make."""
    marker = Path(sys.prefix) / ".moe-gguf-native-key"  # per environment
    return not marker.exists() or marker.read_text().strip() != build_key()


def install(log=print) -> Path:
    wheel = build_wheel(log)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--quiet", str(wheel)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise NativeBuildError(f"installing {wheel} failed:\n{r.stderr[-2000:]}")
    (Path(sys.prefix) / ".moe-gguf-native-key").write_text(build_key())
    log(f"installed {wheel.name}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "build"
    try:
        if cmd == "build":
            install()
            return 0
        if cmd == "wheel":
            print(build_wheel())
            return 0
        if cmd == "key":
            print(build_key())
            return 0
        if cmd == "status":
            from moe_gguf.engine import _lib

            print(_lib.status_line())
            return 0
    except NativeBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("usage: python -m moe_gguf.native [build|wheel|key|status]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
