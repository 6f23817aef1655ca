#!/usr/bin/env bash
# ASan + UBSan run of the patched llama.cpp: the whole test suite, then a 1,000-cycle leak check.
#
#   bash scripts/sanitize.sh            # setup + suite + leak check
#   bash scripts/sanitize.sh setup      # only build/install the sanitizer wheel into .venv-asan
#   bash scripts/sanitize.sh suite [pytest args...]
#   bash scripts/sanitize.sh leak [cycles]
#
# Setup builds a second patched llama-cpp-python with
#   CMAKE_ARGS="-DLLAMA_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON -DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON ..."
# through moe_gguf.native (its own wheel cache key, since CMAKE_ARGS differ) into .venv-asan (gitignored),
# ~22 min cold on 2 cores (1,326 s). Python is not instrumented, so libasan/libubsan are LD_PRELOADed. The suite
# runs with detect_leaks=0 (CPython leaks by design at exit); the leak run creates, steers, captures and
# frees a context 1,000 times with detect_leaks=1 and checks that RSS stays flat.
#
# Sanitizer reports go to $SAN_LOG_DIR (default out/sanitize/); the script fails if any report appears.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ASAN_VENV:-$ROOT/.venv-asan}
PY=${PYTHON:-python3}
LOGS=${SAN_LOG_DIR:-$ROOT/out/sanitize}
mkdir -p "$LOGS"
export CMAKE_ARGS="${SAN_CMAKE_ARGS:--DLLAMA_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON -DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON -DCMAKE_C_FLAGS=-g -DCMAKE_CXX_FLAGS=-g}"

ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  if ! "$VENV/bin/python" -c 'import sys; from moe_gguf import native; sys.exit(0 if not native.needs_rebuild() else 1)' 2>/dev/null; then
    nice -n "${NICE:-10}" "$VENV/bin/python" -m moe_gguf.native build
  fi
  # the wheel must really be instrumented (found without importing it: that needs the preloaded runtime)
  local so
  so=$(ls "$VENV"/lib/python3*/site-packages/llama_cpp/lib/libllama.so | head -1)
  if [ "$(nm -D "$so" | grep -c ' U __asan_report' || true)" = 0 ]; then
    echo "error: $so is not built with AddressSanitizer" >&2
    exit 1
  fi
  echo "sanitizer build ready: $so"
}

# environment for running Python on the instrumented library
san_env() {
  local leaks=$1 tag=$2 context=${3:-30}
  rm -f "$LOGS/$tag".asan.* "$LOGS/$tag".ubsan.*
  export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB"
  # Python/numpy are not instrumented; their allocations are interposed but never reported unless they leak.
  # The leak run keeps 3 frames per allocation so that scripts/lsan.supp matches only allocations made by
  # Python or numpy themselves (see that file)
  export ASAN_OPTIONS="detect_leaks=$leaks:malloc_context_size=$context:halt_on_error=0:abort_on_error=0:detect_odr_violation=0:alloc_dealloc_mismatch=0:allocator_may_return_null=1:symbolize=1:log_path=$LOGS/$tag.asan"
  export LSAN_OPTIONS="suppressions=$ROOT/scripts/lsan.supp:print_suppressions=0:report_objects=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$LOGS/$tag.ubsan"
  export MOE_GGUF_SANITIZE=1
}

# count sanitizer reports for a run; non-zero exit if there are any
reports() {
  local tag=$1 n_asan n_ubsan n_leak
  n_asan=$(cat "$LOGS/$tag".asan.* 2>/dev/null | grep -c "^==[0-9]*==ERROR: AddressSanitizer" || true)
  n_leak=$(cat "$LOGS/$tag".asan.* 2>/dev/null | grep -c "^==[0-9]*==ERROR: LeakSanitizer" || true)
  n_ubsan=$(cat "$LOGS/$tag".ubsan.* 2>/dev/null | grep -c "runtime error:" || true)
  echo "$tag: AddressSanitizer errors: $n_asan, LeakSanitizer reports: $n_leak, UBSan runtime errors: $n_ubsan (logs: $LOGS/$tag.*)"
  [ "$n_asan" = 0 ] && [ "$n_leak" = 0 ] && [ "$n_ubsan" = 0 ]
}

suite() {
  local rc=0
  (
    san_env 0 suite 30
    # -p no:cacheprovider: keep the instrumented run from touching the normal venv's .pytest_cache
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$LOGS/suite.out"
    exit "${PIPESTATUS[0]}"
  ) || rc=1
  reports suite || rc=1
  return $rc
}

leak() {
  local cycles=${1:-1000} rc=0
  (
    san_env 1 leak 3
    "$VENV/bin/python" scripts/leak_cycles.py --cycles "$cycles" --json "$LOGS/leak.json" 2>&1 | tee "$LOGS/leak.out"
    exit "${PIPESTATUS[0]}"
  ) || rc=1
  reports leak || rc=1
  # the canary: the same run leaking one llama context on purpose must be reported, or the check is blind
  (
    san_env 1 canary 3
    "$VENV/bin/python" scripts/leak_cycles.py --cycles 3 --warmup 1 --canary > "$LOGS/canary.out" 2>&1
  ) || true
  if cat "$LOGS"/canary.asan.* 2>/dev/null | grep -q "ERROR: LeakSanitizer"; then
    echo "canary: a context leaked on purpose is reported by LeakSanitizer (the leak check can see native leaks)"
  else
    echo "error: the canary leak was not reported; the leak check is blind" >&2
    rc=1
  fi
  return $rc
}

cmd=${1:-all}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  suite) suite "$@" ;;
  leak) leak "$@" ;;
  all)
    setup
    rc=0
    suite "$@" || rc=1
    leak || rc=1
    exit $rc
    ;;
  *) echo "usage: $0 [all|setup|suite [pytest args]|leak [cycles]]" >&2; exit 2 ;;
esac
