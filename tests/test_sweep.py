"""sweep: every k does the same, fixed work, after an untimed warm-up with every expert in use."""

from __future__ import annotations

import pytest

from moe_gguf import MoEModel, RoutingRecorder
from moe_gguf.study.perplexity import sweep

pytestmark = pytest.mark.native


def test_sweep_warms_up_then_times_a_fixed_number_of_decodes(synth_model):
    with MoEModel(synth_model("qwen3moe"), n_ctx=512, n_threads=2) as m:
        topo = m.topology
        text = list(range(40, 140))  # 100 tokens
        rec = RoutingRecorder(topo.n_layer, topo.n_expert)
        with m.context(n_ctx=512) as ctx, ctx.recording(rec):
            rows = sweep(ctx, [1, 2], text, gen_tokens=5)
            layer0 = int(rec.record.tokens[topo.moe_layers[0]])
            assert ctx.n_expert_used(topo.moe_layers[0]) == topo.n_expert_used  # the model's own k afterwards
    assert [r.n_expert_used for r in rows] == [1, 2]
    warm = 8 + 2  # every expert in use: pages all expert weights in, untimed
    per_k = (8 + 2) + len(text) + (8 + 5)  # untimed decode after the switch, perplexity, timed decodes
    assert layer0 == warm + 2 * per_k  # the timed decodes never stop early at an end-of-generation token
    k1 = rec.record.selections[topo.moe_layers[0]].sum()
    assert k1 == warm * topo.n_expert + per_k * 1 + per_k * 2  # the warm-up routed every token to every expert
