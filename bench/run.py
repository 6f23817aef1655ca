"""moe-gguf benchmark: the patched llama-cpp-python against the stock one, same build flags.

    .venv/bin/python bench/run.py                 # full CPU run -> bench/results/cpu-<N>core.json
    .venv/bin/python bench/run.py --quick         # smoke test: 1-layer model, 3 repetitions
    .venv/bin/python bench/run.py --setup-only    # build both environments and the models
    .venv/bin/python bench/run.py --gpu           # CUDA builds of both, -ngl 99

Every figure is a ratio measured in one run: the driver keeps one worker per environment (bench/worker.py,
model loaded once) and runs each configuration in turn, repetition after repetition (order reversed every
other repetition); a figure is the ratio of the two configurations' medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import envs  # noqa: E402

BENCH = envs.BENCH
MODELS_DIR = BENCH / "models"
DEFAULT_MODELS = "qwen3-30b-a3b:4:q4_0,gpt-oss-20b:4:q4_0"
QUICK_MODELS = "qwen3-30b-a3b:1:q4_0"

# configuration id -> (worker, request); in run order, each next to the configurations compared with it.
# The A/B and probing cases (patched only) get their own worker, so their larger buffers do not stay in
# the RSS of the worker measured against stock.
CONFIGS = {
    f"{w}-{k}{x}": (w, {"case": k, **req})
    for k in ("pp", "tg")
    for w, x, req in (("stock", "", {}), ("patched", "", {}), ("patched", "-p10", {"steer": "p10"}),
                      ("patched", "-p100", {"steer": "p100"}), ("patched", "-route", {"capture": "route"}),
                      ("stock", "-cbeval", {"capture": "cbeval"}))
} | {
    **{f"ab_{k}-{m}": ("patched-ab", {"case": f"ab_{k}", "mode": m}) for k in ("pp", "tg") for m in ("batched", "separate")},
    **{f"probe-{n}": ("patched-ab", {"case": "probe", "n_seq": n}) for n in (1, 8)},
}
WORKER_ENV = {"stock": "stock", "patched": "patched", "patched-ab": "patched"}

# (figure id, group, description, test config, base config, metric, target)
# ratio = test/base for tokens/s and prompts/s; base/test for seconds (a speed-up)
FIGURES = [
    ("pp512_none", "a", "pp512, no profile", "patched-pp", "stock-pp", "tps", 0.99),
    ("tg128_none", "a", "tg128, no profile", "patched-tg", "stock-tg", "tps", 0.99),
    ("pp512_p10", "b", "pp512, profile of 10", "patched-pp-p10", "stock-pp", "tps", 0.99),
    ("tg128_p10", "b", "tg128, profile of 10", "patched-tg-p10", "stock-tg", "tps", 0.99),
    ("pp512_p100", "b", "pp512, profile of 100", "patched-pp-p100", "stock-pp", "tps", 0.99),
    ("tg128_p100", "b", "tg128, profile of 100", "patched-tg-p100", "stock-tg", "tps", 0.99),
    ("pp512_capture", "c", "pp512, route capture (moe-gguf)", "patched-pp-route", "stock-pp", "tps", 0.95),
    ("tg128_capture", "c", "tg128, route capture (moe-gguf)", "patched-tg-route", "stock-tg", "tps", 0.95),
    ("pp512_cbeval", "c", "pp512, cb_eval capture (stock, TopkTap)", "stock-pp-cbeval", "stock-pp", "tps", None),
    ("tg128_cbeval", "c", "tg128, cb_eval capture (stock, TopkTap)", "stock-tg-cbeval", "stock-tg", "tps", None),
    ("ab_pp", "d", "A/B prompt 2x128: one batch vs two runs", "ab_pp-batched", "ab_pp-separate", "seconds", 1.8),
    ("ab_tg", "d", "A/B generate 2x128: one batch vs two runs", "ab_tg-batched", "ab_tg-separate", "seconds", 1.8),
    ("probe", "d", "probe 16 prompts: n_seq 8 vs 1 (prompts/s)", "probe-8", "probe-1", "prompts_per_s", None),
]
MEM_TARGET = 0.01  # memory overhead patched vs stock, plus the capture buffers
PRUNE_FRACTIONS = (0.25, 0.5)  # share of each layer's experts removed by `moe-gguf prune`


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- models --


def ensure_model(spec: str, py: Path) -> tuple[Path, str]:
    """'preset:n_layer:dtype' -> (cached GGUF under bench/models, table label)."""
    from moe_gguf.formats.synth import PRESETS

    preset, n_layer, dtype = (spec.split(":") + ["", ""])[:3]
    n_layer, dtype = int(n_layer or 4), dtype or "q4_0"
    path = MODELS_DIR / f"{preset}-L{n_layer}-{dtype}.gguf"
    label = f"{preset} shape, {n_layer} of {PRESETS[preset].n_layer} layers, {dtype}"
    if not path.exists():
        log(f"writing {path.name} ({label})")
        code = ("import sys; from moe_gguf.formats.synth import resolve_spec, write_gguf; "
                "write_gguf(resolve_spec(sys.argv[1], n_layer=int(sys.argv[2])), sys.argv[3], dtype=sys.argv[4], "
                "name='synth-' + sys.argv[1])")
        tmp = path.with_name(path.name + ".part")
        subprocess.run([str(py), "-c", code, preset, str(n_layer), str(tmp), dtype], check=True, cwd=envs.ROOT)
        tmp.rename(path)
    return path, label


# -- workers --


class Worker:
    """bench/worker.py serving one model in one environment."""

    def __init__(self, env: str, py: Path, model: Path, ngl: int, threads: int | None) -> None:
        self.env = env
        opts = json.dumps({"model": str(model), "ngl": ngl, "threads": threads})
        self.proc = subprocess.Popen([str(py), str(BENCH / "worker.py"), "serve", opts], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=envs.ROOT)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.env} worker exited ({self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"{self.env} worker, {request}: {out['error']}")
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker_info(py: Path) -> dict:
    r = subprocess.run([str(py), str(BENCH / "worker.py"), "info"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


# -- one model --


def bench_model(path: Path, label: str, pys: dict, reps: int, ngl: int, threads: int | None, gpu: bool) -> dict:
    from moe_gguf.formats.topology import ModelTopology

    topo = ModelTopology.from_gguf(path)
    log(f"\n== {label}: loading in both environments")
    workers: dict[str, Worker] = {}
    try:
        for name, env in WORKER_ENV.items():
            workers[name] = Worker(name, pys[env], path, ngl, threads)
        res: dict = {"file": path.name, "label": label, "load": {e: w.ready for e, w in workers.items()}}
        with tempfile.TemporaryDirectory() as tmp:
            dumps = {env: Path(tmp, f"{env}.npy") for env in ("stock", "patched")}
            for env, dump in dumps.items():
                workers[env].ask({"case": "logits", "out": str(dump)})
            a, b = np.load(dumps["stock"]), np.load(dumps["patched"])
            res["logits"] = {"bit_identical": bool(a.shape == b.shape and np.array_equal(a, b)),
                             "max_abs_diff": float(np.abs(a - b).max()) if a.shape == b.shape else None,
                             "shape": list(a.shape)}
        samples: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        order = list(CONFIGS)
        for rep in range(reps):
            t0 = time.time()
            for cid in order if rep % 2 == 0 else order[::-1]:
                name, request = CONFIGS[cid]
                samples[cid].append(workers[name].ask(request))
            log(f"   repetition {rep + 1}/{reps}: {time.time() - t0:.0f} s")
        res["samples"] = samples
        res["figures"] = figures(samples, gpu, (topo.n_layer, topo.n_expert_used))
        return res
    finally:
        for w in workers.values():
            w.close()


def pruned_models(path: Path) -> dict[str, Path]:
    """The model and copies with 25% / 50% of each layer's experts removed (moe_gguf.formats.prune, cached)."""
    from moe_gguf.formats.prune import prune_gguf
    from moe_gguf.formats.topology import ModelTopology

    topo = ModelTopology.from_gguf(path)
    out = {"unpruned": path}
    for frac in PRUNE_FRACTIONS:
        n_rm = int(round(topo.n_expert * frac))
        dst = MODELS_DIR / f"{path.stem}-pruned{int(100 * frac)}.gguf"
        if not dst.exists():
            log(f"writing {dst.name}: {n_rm} of {topo.n_expert} experts removed per layer")
            # random synthetic weights: which experts go does not change the cost, only how many
            prune_gguf(path, dst, remove={il: range(topo.n_expert - n_rm, topo.n_expert) for il in topo.moe_layers})
        out[f"pruned{int(100 * frac)}"] = dst
    return out


def bench_prune(path: Path, label: str, py: Path, reps: int, ngl: int, threads: int | None) -> dict:
    """pp512 / tg128 of the pruned copies against the unpruned model, patched library, alternating."""
    files = pruned_models(path)
    log(f"\n== {label}: pruned copies ({', '.join(files)})")
    workers: dict[str, Worker] = {}
    try:
        for name, f in files.items():
            workers[name] = Worker(f"patched/{name}", py, f, ngl, threads)
        samples: dict[str, list[dict]] = {f"{n}-{c}": [] for n in files for c in ("pp", "tg")}
        order = list(samples)
        for rep in range(reps):
            t0 = time.time()
            for key in order if rep % 2 == 0 else order[::-1]:
                name, case = key.rsplit("-", 1)
                samples[key].append(workers[name].ask({"case": case}))
            log(f"   repetition {rep + 1}/{reps}: {time.time() - t0:.0f} s")
    finally:
        for w in workers.values():
            w.close()
    return {"label": label, "files": {n: {"file": f.name, "size_mib": f.stat().st_size / 2**20} for n, f in files.items()},
            "samples": samples, "figures": prune_figures(samples, files)}


def prune_figures(samples: dict, files: dict) -> dict:
    out = {}
    for name in files:
        if name == "unpruned":
            continue
        for case, n in (("pp", "pp512"), ("tg", "tg128")):
            t, b = med(samples[f"{name}-{case}"], "tps"), med(samples[f"unpruned-{case}"], "tps")
            mt, mb = med(samples[f"{name}-{case}"], "mem_mib"), med(samples[f"unpruned-{case}"], "mem_mib")
            out[f"{n}_{name}"] = {"figure": f"{n}, {name} vs unpruned", "test_median": t, "base_median": b,
                                  "ratio": t / b, "mem_mib_test": mt, "mem_mib_base": mb,
                                  "mem_ratio": mt / mb if mt and mb else None}
    return out


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def figures(samples: dict, gpu: bool, capture_shape: tuple[int, int]) -> dict:
    out = {}
    for fid, group, desc, test, base, metric, target in FIGURES:
        t, b = med(samples[test], metric), med(samples[base], metric)
        ratio = b / t if metric == "seconds" else t / b
        best = {c: (min if metric == "seconds" else max)(r[metric] for r in samples[c]) for c in (test, base)}
        best_ratio = best[base] / best[test] if metric == "seconds" else best[test] / best[base]
        if group == "c" and target is not None and gpu:
            target = 0.90
        f = {"group": group, "figure": desc, "metric": metric, "test": test, "base": base,
             "test_median": t, "base_median": b, "ratio": ratio, "best_of_ratio": best_ratio,
             "paired_ratio_median": statistics.median(
                 (x[metric] / y[metric]) ** (-1 if metric == "seconds" else 1)
                 for x, y in zip(samples[test], samples[base], strict=True)),
             "spread_test": spread(samples[test], metric), "spread_base": spread(samples[base], metric),
             "target_min_ratio": target,
             "met": None if target is None else ratio >= target}
        for kind in ("mem_mib", "rss_peak_mib", "gpu_mib"):
            mt, mb = med(samples[test], kind), med(samples[base], kind)
            f[f"{kind}_test"], f[f"{kind}_base"] = mt, mb
            f[f"{kind}_overhead_ratio"] = mt / mb - 1 if mt is not None and mb else None
        if group in "abc" and target is not None:  # patched against stock: memory target
            allow = capture_allowance(test, capture_shape, f["mem_mib_base"])
            f["mem_met"] = f["mem_mib_overhead_ratio"] <= MEM_TARGET + allow
            if gpu and f["gpu_mib_overhead_ratio"] is not None:
                allow = capture_allowance(test, capture_shape, f["gpu_mib_base"])
                f["mem_met"] = f["mem_met"] and f["gpu_mib_overhead_ratio"] <= MEM_TARGET + allow
        out[fid] = f
    return out


def spread(rows: list[dict], key: str) -> float:
    """(max - min) / median: how noisy a configuration's repetitions were."""
    vals = [r[key] for r in rows]
    return (max(vals) - min(vals)) / statistics.median(vals)


def capture_allowance(test: str, shape: tuple[int, int], base_mib: float) -> float:
    """The capture buffers, relative: ids + weights per ubatch token, layer and used expert; seq/pos/token per token."""
    if not test.endswith("-route") or not base_mib:
        return 0.0
    n_layer, n_used = shape
    return n_layer * 512 * (n_used * 8 + 12) / 2**20 / base_mib


# -- machine and report --


def machine_info(pys: dict, gpu: bool) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "load_avg_start": os.getloadavg(), "cmake_args": " ".join(envs.native.cmake_args()),
            "libraries": {env: worker_info(py) for env, py in pys.items()}}
    if gpu:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["gpu"] = r.stdout.strip()
    return info


def table(results: dict) -> str:
    m = results.get("machine", {})
    load = m.get("load_avg_start", [float("nan")])[0]
    lines = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {results.get('threads', '?')} threads"
             f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; {results.get('reps', '?')} repetitions, "
             f"medians; {results.get('date', '')}; load average {load:.1f} at start"]
    for m in results["models"].values():
        lines += [f"\n### {m['label']}", "",
                  "| figure | base | test | ratio | best-of ratio | target | met | mem base→test (MiB) | mem overhead |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lg = m["logits"]
        lines.append(f"| logits, no profile: patched vs stock | | | {'bit-identical' if lg['bit_identical'] else 'DIFFER'} "
                     f"| | bit-identical | {'met' if lg['bit_identical'] else 'MISSED'} | | |")
        for f in m["figures"].values():
            unit = {"tps": "t/s", "seconds": "s", "prompts_per_s": "p/s"}[f["metric"]]
            target = "—" if f["target_min_ratio"] is None else f"≥{f['target_min_ratio']:.2f}x"
            met = "—" if f["met"] is None else ("met" if f["met"] else "MISSED")
            mem = f"{f['mem_mib_base']:.0f}→{f['mem_mib_test']:.0f}"
            if f.get("gpu_mib_base") is not None:
                mem += f" (GPU {f['gpu_mib_base']:.0f}→{f['gpu_mib_test']:.0f})"
            over = f"{100 * f['mem_mib_overhead_ratio']:+.1f}%"
            if "mem_met" in f:
                over += "" if f["mem_met"] else " MISSED"
            lines.append(f"| {f['figure']} | {f['base_median']:.2f} {unit} | {f['test_median']:.2f} {unit} | "
                         f"{f['ratio']:.3f}x | {f['best_of_ratio']:.3f}x | {target} | {met} | {mem} | {over} |")
    for p in results.get("prune", {}).values():
        lines += [f"\n### moe-gguf prune: {p['label']} (patched library; ratio pruned / unpruned)", "",
                  "| figure | unpruned | pruned | ratio | RSS unpruned→pruned (MiB) |", "|---|---|---|---|---|"]
        sizes = ", ".join(f"{n} {v['size_mib']:.0f} MiB" for n, v in p["files"].items())
        lines.append(f"| file size | | | {sizes} | |")
        for f in p["figures"].values():
            lines.append(f"| {f['figure']} | {f['base_median']:.2f} t/s | {f['test_median']:.2f} t/s | "
                         f"{f['ratio']:.3f}x | {f['mem_mib_base']:.0f}→{f['mem_mib_test']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1-layer qwen3 shape, 3 repetitions")
    ap.add_argument("--reps", type=int, help="repetitions per configuration (default 5; 3 with --quick)")
    ap.add_argument("--models", help=f"comma-separated preset:n_layer:dtype (default {DEFAULT_MODELS})")
    ap.add_argument("--out", type=Path, help="result JSON (default bench/results/<cpu|gpu>-<N>core.json)")
    ap.add_argument("--gpu", action="store_true", help="CUDA builds of both libraries (-DGGML_CUDA=on), -ngl 99")
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ap.add_argument("--setup-only", action="store_true", help="build both environments and the models, then exit")
    ap.add_argument("--no-prune", action="store_true", help="skip pp/tg of the 25%% / 50%% pruned copies of the first model")
    ap.add_argument("--only-prune", action="store_true", help="only the pruned-copies comparison")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    models = (args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)).split(",")
    if args.gpu:
        if "GGML_CUDA=on" not in os.environ.get("CMAKE_ARGS", ""):
            os.environ["CMAKE_ARGS"] = (os.environ.get("CMAKE_ARGS", "") + " -DGGML_CUDA=on").strip()
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if _which("nvidia-smi") else None
        if r is None or r.returncode != 0:
            log("--gpu: no NVIDIA GPU found (nvidia-smi); run without --gpu on this machine")
            return 2

    pys = {"stock": envs.stock_python(log), "patched": envs.patched_python(log)}
    paths = [ensure_model(m, pys["patched"]) for m in models]
    if args.setup_only:
        if not args.no_prune:
            pruned_models(paths[0][0])
        log(f"ready: stock {pys['stock']}, patched {pys['patched']}, models {[str(p) for p, _ in paths]}")
        return 0

    info = machine_info(pys, args.gpu)
    if args.gpu and not all(v["gpu_offload"] for v in info["libraries"].values()):
        log(f"--gpu: a library without GPU offload: {info['libraries']}")
        return 2
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join([sys.executable, *sys.argv]), "reps": reps,
               "threads": args.threads or os.cpu_count(), "gpu": args.gpu, "machine": info, "models": {}}
    t0 = time.time()
    ngl = 99 if args.gpu else 0
    for path, label in ([] if args.only_prune else paths):
        results["models"][path.stem] = bench_model(path, label, pys, reps, ngl, args.threads, args.gpu)
    if not args.no_prune:
        path, label = paths[0]
        results["prune"] = {path.stem: bench_prune(path, label, pys["patched"], reps, ngl, args.threads)}
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - t0
    out = args.out or BENCH / "results" / f"{'gpu' if args.gpu else 'cpu'}-{os.cpu_count()}core.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    log(f"\nwrote {out} ({results['wall_s']:.0f} s; load average {info['load_avg_start'][0]:.1f} at start, "
        f"{results['machine']['load_avg_end'][0]:.1f} at end)")
    return 0


def _which(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


if __name__ == "__main__":
    raise SystemExit(main())
