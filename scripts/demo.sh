#!/usr/bin/env bash
# The main job: make a small synthetic MoE model, show its topology, and generate steered vs unsteered.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
M=out/tiny-qwen3moe-q8_0.gguf
[ -f "$M" ] || .venv/bin/moe-gguf synth tiny-qwen3moe --dtype q8_0 -o "$M"
.venv/bin/moe-gguf info "$M"
.venv/bin/python - "$M" <<'PY'
import sys
from moe_gguf.profile import SteeringProfile
from moe_gguf.topology import ModelTopology
topo = ModelTopology.from_gguf(sys.argv[1])
p = SteeringProfile.for_model(topo, name="demo")
for layer in topo.moe_layers:
    p.disable(layer, 0).force(layer, 1)
p.save("out/demo-profile.json")
print("wrote out/demo-profile.json:", p.summary())
PY
.venv/bin/moe-gguf generate -m "$M" --profile out/demo-profile.json -p "hello world" -n 24 --compare
