#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite against the real patched llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check moe_gguf tests tui
.venv/bin/python -m pytest -q "$@"
