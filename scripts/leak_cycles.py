"""Create / steer / capture / free a llama context many times and measure the process's memory.

    python scripts/leak_cycles.py [--model M.gguf] [--cycles 1000] [--json out.json]

Each cycle: a new SteerContext with two sequences, a steering profile on one of them (uploaded through
llama_moe_steer_set_layer / llama_moe_steer_seq), a routing recorder (llama_moe_set_route_callback), a batched
decode of both sequences with every token's routing captured, a short steered generation, the expert count
changed and restored, the capture switched off, the context freed. RSS is read from /proc after a warm-up
(allocator pools and caches fill during the first cycles) and at the end. Under scripts/sanitize.sh this runs
with LeakSanitizer on, which reports any allocation of the native library that was never freed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run(model_path: str | Path, *, cycles: int = 1000, warmup: int = 50, log=None) -> dict:
    import numpy as np

    from moe_gguf.engine.model import MoEModel
    from moe_gguf.errors import DecodeError
    from moe_gguf.formats.profile import SteeringProfile
    from moe_gguf.formats.records import RoutingRecorder

    model = MoEModel(model_path, n_ctx=256, n_threads=2)
    topo = model.topology
    profile = SteeringProfile.for_model(topo, name="leak")
    for layer in topo.moe_layers:
        profile.disable(layer, 0).force(layer, 1).bias(layer, 2, -1.5).scale(layer, 3, 2.0)
    prompt = model.tokenize("the quick brown fox jumps over the lazy dog")
    rss: list[tuple[int, int]] = []
    failures = 0
    routed = 0
    t0 = time.time()
    for i in range(cycles):
        if i == warmup:
            gc.collect()
            rss.append((i, rss_kib()))
        try:
            with model.context(n_seq_max=2, n_ctx=128, n_batch=64) as ctx:
                ctx.set_profile(profile, seq_id=0, strength=0.5 + (i % 3) / 2)
                rec = RoutingRecorder(topo.n_layer, topo.n_expert, traces=i % 10 == 0)
                with ctx.recording(rec, with_probs=i % 2 == 0):
                    ctx.decode([(0, prompt, 0), (1, prompt, 0)], logits="all")
                routed += int(rec.record.tokens.sum())
                ctx.set_n_expert_used(topo.n_expert_used + 1)
                ctx.set_n_expert_used(0)
                ctx.generate(prompt[:4], profile=profile, max_tokens=3)
                ctx.clear_steering()
        except DecodeError:
            failures += 1
        if log and (i + 1) % 100 == 0:
            log(f"cycle {i + 1}/{cycles}: RSS {rss_kib()} KiB")
    gc.collect()
    rss.append((cycles, rss_kib()))
    model.close()
    first, last = rss[0], rss[-1]
    per_cycle = (last[1] - first[1]) / max(1, last[0] - first[0])
    return {"cycles": cycles, "warmup": warmup, "rss_kib_after_warmup": first[1], "rss_kib_at_end": last[1],
            "rss_growth_kib": last[1] - first[1], "rss_growth_per_cycle_kib": round(per_cycle, 3),
            "decode_failures": failures, "tokens_routed": routed, "seconds": round(time.time() - t0, 1),
            "numpy": np.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a MoE GGUF (default: a tiny synthetic qwen3moe, written to a temp dir)")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--max-growth-kib", type=float, default=4.0, help="fail above this RSS growth per cycle")
    ap.add_argument("--canary", action="store_true",
                    help="leak one llama context on purpose (never freed), to show LeakSanitizer catches it")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if path is None:
            from moe_gguf.formats.synth import PRESETS, write_gguf

            path = write_gguf(PRESETS["tiny-qwen3moe"], Path(tmp) / "tiny-qwen3moe.gguf")
        res = run(path, cycles=a.cycles, warmup=min(a.warmup, a.cycles), log=lambda m: print(m, file=sys.stderr))
        if a.canary:
            from llama_cpp import llama_cpp as low

            from moe_gguf.engine.model import MoEModel

            m = MoEModel(path, n_ctx=64, n_threads=1)
            params = low.llama_context_default_params()
            params.n_ctx = 64
            low.llama_init_from_model(m.llama.model, params)  # the context is never freed
            m.close()
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    ok = res["decode_failures"] == 0 and res["rss_growth_per_cycle_kib"] <= a.max_growth_kib
    print(f"{'ok' if ok else 'FAIL'}: {res['cycles']} cycles, RSS {res['rss_kib_after_warmup']} -> "
          f"{res['rss_kib_at_end']} KiB ({res['rss_growth_per_cycle_kib']} KiB per cycle)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
