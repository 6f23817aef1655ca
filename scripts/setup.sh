#!/usr/bin/env bash
# Set up moe-gguf from nothing, idempotently: a virtualenv in .venv, the package and its dev tools,
# and the patched llama-cpp-python (built once, then reinstalled from the wheel cache in seconds).
# Needs: python3 (>=3.10) with venv, a C/C++ compiler, CMake. Honours CMAKE_ARGS (e.g. -DGGML_CUDA=on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# pip's build notices go to a log, shown only if the install fails
.venv/bin/python -m pip install -q -e '.[dev]' > .venv/pip-install.log 2>&1 || { cat .venv/pip-install.log; exit 1; }
if ! .venv/bin/python -c 'import sys; from moe_gguf import native; from moe_gguf.engine import _lib; sys.exit(0 if _lib.STATUS.ok and not native.needs_rebuild() else 1)' 2>/dev/null; then
  .venv/bin/python -m moe_gguf.native build
fi
