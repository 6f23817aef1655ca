#!/usr/bin/env bash
# Every MoE architecture llama.cpp can write, through moe-gguf (README "Architectures"): builds llama.cpp's
# tests/test-llama-archs once (cached in $MOE_GGUF_CACHE/archs, minutes cold), generates its random-weight GGUFs
# with 8 experts / 2 used and 16 / 4, and checks load / steer / capture / prune on each; the table goes to stdout
# and to docs/archs.md. Extra arguments go to `python -m tests.archs.suite` (-a REGEX, --configs 8:2, --no-prune).
# With STOCK=1 the no-profile logits are also compared with the stock llama-cpp-python (bench/envs.py builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${STOCK:-0}" = 1 ]; then
  MOE_GGUF_ARCHS_STOCK_PYTHON=$(.venv/bin/python -c 'from bench import envs; print(envs.stock_python(lambda m: None))')
  export MOE_GGUF_ARCHS_STOCK_PYTHON
fi
.venv/bin/python -m tests.archs.suite --md docs/archs.md "$@"
