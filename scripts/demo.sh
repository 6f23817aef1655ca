#!/usr/bin/env bash
# The main job: find the refusal experts of the shipped tiny trained MoE model, switch them off, and
# judge what really changed (refusal / compliance / degenerate) on held-out prompts. No model is synthesized:
# it uses the trained model shipped in moe_gguf/demo/data/. ~5 min on 2 cores; exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moe-gguf info moe_gguf/demo/data/moe-gguf-refusal-demo-q8_0.gguf
.venv/bin/moe-gguf demo -o out/demo --json out/demo/summary.json "$@"
