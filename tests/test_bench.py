"""Smoke test of the benchmark harness (bench/): the worker's cases on a tiny model, the figures' arithmetic.

The stock environment (a separate build) is not needed here; bench/run.py --quick runs it all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.native
def test_profiles_fit_the_model(synth_model):
    from worker import bench_profile

    from moe_gguf.formats.topology import ModelTopology

    topo = ModelTopology.from_gguf(synth_model("qwen3moe"))  # 2 layers, 8 experts, top-2
    for n, expect in ((10, 10), (100, 2 * (1 + 6))):  # per layer: force 1, disable 6
        p = bench_profile(topo, n)
        p.validate(topo)
        assert len(p.entries) == expect
        assert {e.action for e in p.entries} == {"disable", "force"}


@pytest.mark.native
def test_worker_serves_every_case(synth_model, tmp_path):
    model = synth_model("qwen3moe")
    requests = [{"case": "logits", "out": str(tmp_path / "l.npy")}, {"case": "pp", "steer": "p10"},
                {"case": "tg", "capture": "route"}, {"case": "tg", "capture": "cbeval"},
                {"case": "ab_tg", "mode": "batched", "prompt": 4}, {"case": "ab_pp", "mode": "separate", "prompt": 8},
                {"case": "probe", "n_seq": 2, "n_items": 2}]
    r = subprocess.run([sys.executable, str(BENCH / "worker.py"), "serve", json.dumps({"model": str(model)})],
                       input="".join(json.dumps(q) + "\n" for q in requests), capture_output=True, text=True, timeout=300)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[0]["ready"], r.stderr
    out = dict(zip([q["case"] + q.get("capture", "") for q in requests], lines[1:], strict=True))
    assert all("error" not in o for o in out.values()), out
    assert np.load(tmp_path / "l.npy").shape == (64, 512)
    assert out["pp"]["tps"] > 0 and out["pp"]["mem_mib"] > 0
    assert out["tgroute"]["captured"] == 2 * 129  # 2 layers, warmup + 128 tokens
    assert out["tgcbeval"]["captured"] == 2 * 129
    assert len(out["ab_tg"]["generated"]) == 2 and min(out["ab_tg"]["generated"]) > 0
    assert out["probe"]["prompts_per_s"] > 0


def test_figures_are_ratios():
    import run

    samples = {c: [{"tps": 100.0, "seconds": 1.0, "prompts_per_s": 2.0, "mem_mib": 1000.0, "rss_peak_mib": 1100.0,
                    "gpu_mib": None}] for c in run.CONFIGS}
    samples["patched-pp"] = [{"tps": 98.0, "mem_mib": 1005.0, "rss_peak_mib": 1105.0, "gpu_mib": None}]
    samples["ab_tg-batched"] = [{"seconds": 0.5, "mem_mib": 1000.0, "rss_peak_mib": 1100.0, "gpu_mib": None}]
    figs = run.figures(samples, gpu=False, capture_shape=(4, 8))
    assert figs["pp512_none"]["ratio"] == 0.98 and figs["pp512_none"]["met"] is False
    assert figs["pp512_none"]["mem_met"] is True  # +0.5%
    assert figs["ab_tg"]["ratio"] == 2.0 and figs["ab_tg"]["met"] is True
    assert figs["pp512_cbeval"]["met"] is None
    assert "| pp512, no profile |" in run.table({"models": {"m": {"label": "m", "logits": {"bit_identical": True},
                                                                    "figures": figs}}})


def test_prune_figures_and_copies(synth_model, tmp_path, monkeypatch):
    import run

    monkeypatch.setattr(run, "MODELS_DIR", tmp_path)
    files = run.pruned_models(synth_model("qwen3moe"))  # 8 experts: 2 and 4 removed per layer
    from moe_gguf.formats.topology import ModelTopology

    assert [ModelTopology.from_gguf(f).n_expert for f in files.values()] == [8, 6, 4]
    samples = {f"{n}-{c}": [{"tps": {"unpruned": 100.0, "pruned25": 110.0, "pruned50": 125.0}[n], "mem_mib": 10.0}]
               for n in files for c in ("pp", "tg")}
    figs = run.prune_figures(samples, files)
    assert figs["pp512_pruned50"]["ratio"] == 1.25 and figs["tg128_pruned25"]["ratio"] == 1.1
    res = {"models": {}, "prune": {"m": {"label": "m", "figures": figs,
                                         "files": {n: {"size_mib": f.stat().st_size / 2**20} for n, f in files.items()}}}}
    assert "| pp512, pruned50 vs unpruned |" in run.table(res)
