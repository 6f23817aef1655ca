#!/usr/bin/env bash
# The full fuzzing run: >= 100,000 inputs per target (profile files, probe datasets, both kinds of count
# file, the C API on two architectures) and MOE_GGUF_FUZZ_GGUF corrupted/truncated GGUFs per architecture.
#
#   bash scripts/fuzz.sh                                   # 100,000 inputs per target
#   MOE_GGUF_FUZZ_EXAMPLES=1000000 bash scripts/fuzz.sh    # more
#   MOE_GGUF_FUZZ_SEED=7 bash scripts/fuzz.sh              # other inputs
#
# CI runs the same tests with a few hundred inputs each (pytest tests/test_fuzz.py). Here the generators are
# driven by a seeded PRNG (MOE_GGUF_FUZZ_ENGINE=hypothesis to use Hypothesis instead, ~50x slower per input).
# The inputs tried per target and their outcomes are written to out/fuzz-report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MOE_GGUF_FUZZ_EXAMPLES=${MOE_GGUF_FUZZ_EXAMPLES:-100000}
export MOE_GGUF_FUZZ_GGUF=${MOE_GGUF_FUZZ_GGUF:-1000}
mkdir -p out
export MOE_GGUF_FUZZ_REPORT=${MOE_GGUF_FUZZ_REPORT:-$PWD/out/fuzz-report.json}
rm -f "$MOE_GGUF_FUZZ_REPORT"
start=$(date +%s)
nice -n "${NICE:-10}" "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz.py --durations=0 "$@"
echo "fuzzing done in $(( $(date +%s) - start )) s; counts: $MOE_GGUF_FUZZ_REPORT"
cat "$MOE_GGUF_FUZZ_REPORT"
