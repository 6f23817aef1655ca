#!/usr/bin/env bash
# The long versions of tests/test_reliability.py (CI runs them small): SIGKILLs injected into a running
# `moe-gguf probe` and into every kind of file save, full-disk faults, the two-thread comparison repeated,
# and the 1,000-cycle context leak check (RSS). Figures go to out/reliability-report.json.
#
#   bash scripts/reliability.sh
#   MOE_GGUF_KILLS=200 bash scripts/reliability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MOE_GGUF_KILLS=${MOE_GGUF_KILLS:-50}
export MOE_GGUF_SAVE_KILLS=${MOE_GGUF_SAVE_KILLS:-1000}
export MOE_GGUF_THREAD_ROUNDS=${MOE_GGUF_THREAD_ROUNDS:-20}
export MOE_GGUF_LEAK_CYCLES=${MOE_GGUF_LEAK_CYCLES:-1000}
mkdir -p out
export MOE_GGUF_RELIABILITY_REPORT=${MOE_GGUF_RELIABILITY_REPORT:-$PWD/out/reliability-report.json}
rm -f "$MOE_GGUF_RELIABILITY_REPORT"
start=$(date +%s)
nice -n "${NICE:-10}" "$PY" -m pytest -q -p no:cacheprovider tests/test_reliability.py --durations=10 "$@"
echo "done in $(( $(date +%s) - start )) s: $MOE_GGUF_RELIABILITY_REPORT"
cat "$MOE_GGUF_RELIABILITY_REPORT"
