"""Benchmark measurements, run inside the stock or the patched venv; JSON lines on stdout.

    python bench/worker.py info                                  # library facts, one JSON line
    python bench/worker.py serve '{"model": "m.gguf", "ngl": 0}'  # load once, then one case per stdin line

A served worker loads the model once and answers each request line, e.g. {"case": "pp", "steer": "p10"},
with one JSON line. Cases: logits (out: .npy path), pp, tg (steer none|p10|p100, capture none|route|cbeval),
ab_pp, ab_tg (mode batched|separate), probe (n_seq). Every case gets a fresh context. The stock
and the patched venv run the same code: a llama_cpp.Llama for the model (MoEModel's in the patched
venv) and a raw llama_context with SteerContext's parameters, decoded with the same batches; only
the patched venv sets profiles or the route callback.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# imported in both venvs, so both processes carry the same Python modules; the patch is needed only when used
import llama_cpp  # noqa: E402
from llama_cpp import llama_cpp as low  # noqa: E402

from moe_gguf.engine import _lib  # noqa: E402
from moe_gguf.engine.cbeval import TopkTap  # noqa: E402
from moe_gguf.engine.context import Request  # noqa: E402
from moe_gguf.engine.model import MoEModel  # noqa: E402
from moe_gguf.engine.offload import gpu_devices  # noqa: E402
from moe_gguf.formats.profile import SteeringProfile  # noqa: E402
from moe_gguf.formats.records import RoutingRecorder  # noqa: E402
from moe_gguf.formats.topology import ModelTopology  # noqa: E402
from moe_gguf.study.probe import ProbeItem, probe  # noqa: E402

PATCHED = _lib.STATUS.ok
N_CTX = 1024
N_BATCH = 512
PP, TG = 512, 128  # llama-bench's pp512 / tg128
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches at dawn".split()


def info() -> dict:
    return {"patched": PATCHED, "version": llama_cpp.__version__, "status": _lib.status_line(),
            "system_info": low.llama_print_system_info().decode().strip(),
            "gpu_offload": bool(gpu_devices())}  # ggml's device list: both libraries have it


def vm(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak() -> None:
    """Hand freed heap back to the OS, then start a new peak (VmHWM) from the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class Bench:
    def __init__(self, model: str, ngl: int = 0, threads: int | None = None) -> None:
        self.path = model
        self.threads = threads or os.cpu_count() or 1
        self.topo = ModelTopology.from_gguf(model) if PATCHED else None  # MoEModel reads it again
        gc.collect()
        self.rss_before_load = vm("VmRSS")
        t0 = time.perf_counter()
        if PATCHED:
            self.model = MoEModel(model, n_ctx=N_CTX, n_gpu_layers=ngl, n_threads=self.threads, n_batch=N_BATCH)
            self.llama = self.model.llama
        else:  # MoEModel's own Llama arguments
            self.llama = llama_cpp.Llama(model_path=model, n_ctx=N_CTX, n_gpu_layers=ngl, n_threads=self.threads,
                                         n_batch=N_BATCH, seed=0, kv_overrides=None, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.n_vocab = low.llama_vocab_n_tokens(low.llama_model_get_vocab(self.llama.model))
        self.contexts: list = []

    def run(self, spec: dict) -> dict:
        self.spec, self.tap, self.recorder = spec, None, None
        self.rng = np.random.default_rng(spec.get("seed", 0))
        reset_peak()
        try:
            out = getattr(self, spec["case"])()
            out["gpu_mib"] = gpu_mem_mib()  # while the context is still allocated
        finally:
            self.free()
        out["rss_peak_mib"] = vm("VmHWM")
        out["mem_mib"] = out["rss_peak_mib"] - self.rss_before_load  # what loading and running added
        return out

    # -- a context like SteerContext's, in both venvs --

    def context(self, n_seq: int = 1, steer: str = "none", capture: str = "none"):
        cb = None
        if capture == "cbeval":
            self.tap = TopkTap()
            cb = self.tap.callback
        if PATCHED:
            ctx = self.model.context(n_ctx=N_CTX, n_seq_max=n_seq, n_batch=N_BATCH, cb_eval=cb)
            self.contexts.append(ctx)
            if steer != "none":
                ctx.set_profile(bench_profile(self.topo, int(steer[1:])))
            if capture == "route":
                self.recorder = RoutingRecorder(self.topo.n_layer, self.topo.n_expert)
                ctx.set_recorder(self.recorder)
            return ctx, ctx.ctx
        if steer != "none" or capture == "route":
            raise RuntimeError(f"the stock library cannot steer or capture (steer={steer}, capture={capture})")
        p = low.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = N_CTX, N_BATCH, N_BATCH, n_seq
        p.n_threads = p.n_threads_batch = self.threads
        p.kv_unified = True
        if cb is not None:
            p.cb_eval, p.cb_eval_user_data = cb, None
        raw = low.llama_init_from_model(self.llama.model, p)
        self.contexts.append(raw)
        return None, raw

    def free(self) -> None:
        for c in self.contexts:
            c.close() if hasattr(c, "close") else low.llama_free(c)
        self.contexts.clear()

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(300, self.n_vocab, n).tolist()

    def decode(self, raw, toks: list[int], pos0: int = 0, all_logits: bool = False) -> None:
        """One sequence's tokens in one batch; outputs for every token or the last (as llama-bench)."""
        b = low.llama_batch_init(len(toks), 0, 1)
        for j, t in enumerate(toks):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, pos0 + j, 1, all_logits or j == len(toks) - 1
            b.seq_id[j][0] = 0
        b.n_tokens = len(toks)
        rc = low.llama_decode(raw, b)
        low.llama_synchronize(raw)
        low.llama_batch_free(b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def clear(self, raw) -> None:
        low.llama_memory_clear(low.llama_get_memory(raw), True)

    def captured(self) -> dict:
        if self.recorder is not None:
            return {"captured": int(self.recorder.record.tokens.sum())}  # token-layers seen
        if self.tap is not None:
            return {"captured": int(sum(len(x) for v in self.tap.topk.values() for x in v))}
        return {}

    # -- cases --

    def logits(self) -> dict:
        _, raw = self.context()
        toks = self.tokens(64)
        self.decode(raw, toks, all_logits=True)
        out = np.stack([np.ctypeslib.as_array(low.llama_get_logits_ith(raw, i), shape=(self.n_vocab,)).copy()
                        for i in range(len(toks))])
        np.save(self.spec["out"], out)
        return {"shape": list(out.shape)}

    def pp(self) -> dict:
        _, raw = self.context(steer=self.spec.get("steer", "none"), capture=self.spec.get("capture", "none"))
        self.decode(raw, self.tokens(32))  # warmup, as llama-bench
        self.clear(raw)
        toks = self.tokens(PP)
        t0 = time.perf_counter()
        self.decode(raw, toks)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "tps": PP / dt, **self.captured()}

    def tg(self) -> dict:
        _, raw = self.context(steer=self.spec.get("steer", "none"), capture=self.spec.get("capture", "none"))
        self.decode(raw, self.tokens(1))  # warmup, as llama-bench
        self.clear(raw)
        toks = self.tokens(TG)
        t0 = time.perf_counter()
        for i, t in enumerate(toks):
            self.decode(raw, [t], i)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "tps": TG / dt, **self.captured()}

    def _ab(self, timed) -> dict:
        """A/B of one prompt, steered (p10) and not: both sequences in one batch, or two runs in a row."""
        ctx, _ = self.context(n_seq=2)
        prof = bench_profile(self.topo, 10)
        prompt = self.tokens(self.spec.get("prompt", 128))
        run = (lambda: timed(ctx, [Request(prompt, prof, TG), Request(prompt, None, TG)])) \
            if self.spec["mode"] == "batched" else \
            (lambda: timed(ctx, [Request(prompt, prof, TG)]) + timed(ctx, [Request(prompt, None, TG)]))
        run()  # warmup
        return {"seconds": run()}

    def ab_pp(self) -> dict:
        def timed(ctx, reqs) -> float:  # the prompts only
            for s, r in enumerate(reqs):
                ctx.set_profile(r.profile, seq_id=s)
            ctx.clear_memory()
            t0 = time.perf_counter()
            ctx.decode([(s, r.tokens, 0) for s, r in enumerate(reqs)])
            return time.perf_counter() - t0

        return self._ab(timed)

    def ab_tg(self) -> dict:
        self.spec.setdefault("prompt", 16)
        lengths = []

        def timed(ctx, reqs) -> float:  # greedy generation of TG tokens each (prompt included)
            t0 = time.perf_counter()
            outs = ctx.generate_many(reqs)
            lengths.extend(len(o.tokens) for o in outs)
            return time.perf_counter() - t0

        out = self._ab(timed)
        out["generated"] = lengths[-2:]  # tokens generated per sequence in the timed run
        return out

    def probe(self) -> dict:
        n_seq, n_items = self.spec["n_seq"], self.spec.get("n_items", 16)
        items = [ProbeItem(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(26)), f"l{i % 2}") for i in range(n_items)]
        probe(self.model, items[:n_seq], chat=False, n_seq=n_seq)  # warmup
        t0 = time.perf_counter()
        res = probe(self.model, items, chat=False, n_seq=n_seq)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "prompts_per_s": n_items / dt, "tokens": int(res.item_tokens[:, 0].sum())}


def bench_profile(topo: ModelTopology, n: int) -> SteeringProfile:
    """n entries alternating disable/force, round-robin over the MoE layers; fewer if no more fit.

    At most half of n_expert_used experts are forced per layer (forcing all would send every token
    through the same experts) and at most n_expert - n_expert_used disabled.
    """
    p = SteeringProfile.for_model(topo, name=f"bench-{n}")
    layers = list(topo.moe_layers)
    cap = {"force": max(1, topo.n_expert_used // 2), "disable": topo.n_expert - topo.n_expert_used}
    used = {(layer, a): 0 for layer in layers for a in cap}
    taken: dict[int, set[int]] = {layer: set() for layer in layers}
    for i in range(4 * n):
        if len(p.entries) == n:
            break
        layer = layers[i % len(layers)]
        for action in ("force", "disable") if i % 2 else ("disable", "force"):
            if used[layer, action] < cap[action]:
                e = (len(taken[layer]) * 37 + layer * 11) % topo.n_expert
                while e in taken[layer]:
                    e = (e + 1) % topo.n_expert
                taken[layer].add(e)
                used[layer, action] += 1
                getattr(p, action)(layer, e)
                break
    return p


def gpu_mem_mib() -> float | None:
    """This process's GPU memory (nvidia-smi); None without an NVIDIA GPU."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in r.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mib)
    return None


def serve(opts: dict) -> None:
    bench = Bench(opts["model"], opts.get("ngl", 0), opts.get("threads"))
    print(json.dumps({"ready": True, "load_s": bench.load_s, "rss_before_load_mib": bench.rss_before_load,
                      "rss_mib": vm("VmRSS")}), flush=True)
    for line in sys.stdin:
        if line.strip():
            try:
                out = bench.run(json.loads(line))
            except Exception as e:  # answer, so the driver can report which case failed
                out = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "info":
        print(json.dumps(info()))
    else:
        serve(json.loads(sys.argv[2]))
