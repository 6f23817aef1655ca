"""llama.cpp's own random-weight model of every architecture: build `test-llama-archs` once, generate GGUFs.

    python -m tests.archs.build                 # build (cached), then print the binary's path
    python -m tests.archs.build gen 8 2 [ARCH]  # the MoE models with 8 experts, 2 used; prints their folder

`tests/test-llama-archs.cpp` of the llama.cpp vendored in the pinned llama-cpp-python sdist has a `-o DIR` mode
that writes one small GGUF per architecture, through llama.cpp's own model saver (so every file is one that
llama.cpp itself wrote and loads). Upstream hard-codes 2 experts, 2 used; `test-llama-archs-expert-counts.patch`
(a local edit of the test only, applied here, not part of moe-gguf's llama.cpp patch) adds `-E N` / `-K N`.

The test is built from the stock vendored sources (the file writer does not involve moe-gguf's patch),
statically, without -march=native, and cached under `$MOE_GGUF_CACHE/archs/<key>/` (key: sdist, this patch,
the cmake arguments), like the patched wheel. Generated models are cached beside it, per expert counts.
Stdlib only.
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

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from moe_gguf import native  # noqa: E402  (stdlib only)

PATCH = Path(__file__).resolve().parent / "test-llama-archs-expert-counts.patch"
CMAKE_ARGS = [
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
]
SEED = "42"  # the generated weights depend on it; fixed so every run (and every machine) makes the same files


class ArchsBuildError(RuntimeError):
    pass


def key() -> str:
    h = hashlib.sha256()
    for part in (native.SDIST_SHA256, PATCH.read_bytes().decode(), " ".join(CMAKE_ARGS), sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return native.cache_dir() / "archs" / key()


def binary(log=print) -> Path:
    """The patched `test-llama-archs`, built on first use (minutes), then cached."""
    exe = cache_dir() / "test-llama-archs"
    if exe.is_file():
        return exe
    if shutil.which("cmake") is None:
        raise ArchsBuildError("cmake is not installed; it is needed to build llama.cpp's test-llama-archs")
    sdist = native.fetch_sdist(log)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    args = list(CMAKE_ARGS)
    if shutil.which("ninja") is None:
        args = args[2:]  # the default generator
    with tempfile.TemporaryDirectory(prefix="moe-gguf-archs-") as tmp:
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name]
            tf.extractall(tmp, members=members, filter="data") if hasattr(tarfile, "data_filter") \
                else tf.extractall(tmp, members=members)
        src = Path(tmp) / f"llama_cpp_python-{native.LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
        tool = ["patch", "-p1", "--batch", "-i", str(PATCH)] if shutil.which("patch") else ["git", "apply", str(PATCH)]
        r = subprocess.run(tool, cwd=src, capture_output=True, text=True)
        if r.returncode != 0:
            raise ArchsBuildError(f"{PATCH.name} does not apply to llama.cpp's tests/test-llama-archs.cpp:\n{r.stdout}{r.stderr}")
        build = Path(tmp) / "build"
        log(f"building llama.cpp's test-llama-archs ({jobs} jobs; minutes, once)")
        t0 = time.time()
        logfile = native.cache_dir() / "archs-build.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "w") as lf:
            for cmd in (["cmake", "-S", str(src), "-B", str(build), *args],
                        ["cmake", "--build", str(build), "--target", "test-llama-archs", "-j", jobs]):
                r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    raise ArchsBuildError(f"{' '.join(cmd[:3])} failed (log: {logfile}):\n"
                                          f"{logfile.read_text(errors='replace')[-3000:]}")
        built = next(build.rglob("test-llama-archs"), None)
        if built is None:
            raise ArchsBuildError(f"the build made no test-llama-archs binary (log: {logfile})")
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp_exe = exe.with_suffix(".tmp")
        shutil.copy2(built, tmp_exe)
        tmp_exe.replace(exe)
        (exe.parent / "build-seconds").write_text(f"{time.time() - t0:.0f}\n")
        log(f"built in {time.time() - t0:.0f} s: {exe}")
    return exe


def generate(n_expert: int, n_expert_used: int, arch: str | None = None, log=print) -> Path:
    """The folder of MoE GGUFs (`<arch>-moe.gguf`) with these expert counts, generated once.

    `arch` (an exact name or a regex, as test-llama-archs' `-a` takes it) limits the generation to some
    architectures; each selection gets its own folder.
    """
    sel = "all" if arch is None else hashlib.sha256(arch.encode()).hexdigest()[:8]
    out = cache_dir() / "models" / f"e{n_expert}k{n_expert_used}-{sel}"
    if (out / ".done").exists():
        return out
    exe = binary(log)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + "-", dir=out.parent if out.parent.exists() else None))
    try:
        cmd = [str(exe), "-s", SEED, "-E", str(n_expert), "-K", str(n_expert_used), "-o", str(tmp)]
        if arch is not None:
            cmd += ["-a", arch]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise ArchsBuildError(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        for f in tmp.glob("*-dense.gguf"):
            f.unlink()
        (tmp / ".done").write_text(f"{time.time() - t0:.1f} s\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] == "build":
            print(binary(lambda m: print(m, file=sys.stderr)))
            return 0
        if argv[0] == "gen" and len(argv) in (3, 4):
            print(generate(int(argv[1]), int(argv[2]), argv[3] if len(argv) == 4 else None,
                           lambda m: print(m, file=sys.stderr)))
            return 0
        if argv[0] == "key":
            print(key())
            return 0
    except (ArchsBuildError, native.NativeBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("usage: python -m tests.archs.build [build | gen N_EXPERT N_EXPERT_USED [ARCH] | key]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
