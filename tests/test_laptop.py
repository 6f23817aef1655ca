"""Laptop scale: experts per token at run time, expert offload placement."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gguf.engine import _lib
from moe_gguf.engine.model import MoEModel
from moe_gguf.engine.offload import OffloadError, Placement
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecorder

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp

PROMPT = list(range(50, 82))


def routed(ctx, topo):
    rec = RoutingRecorder(topo.n_layer, topo.n_expert)
    with ctx.recording(rec):
        ctx.clear_memory()
        logits = ctx.decode([(0, PROMPT, 0)], logits="all")[0]
    return logits, rec.record


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss"])
def test_experts_per_token_at_run_time(synth_model, arch):
    with MoEModel(synth_model(arch, "f32"), n_ctx=256, n_threads=2) as m:
        topo = m.topology
        with m.context(n_batch=256) as ctx:
            base_logits, base = routed(ctx, topo)
            for k in (1, topo.n_expert_used + 1):
                ctx.set_n_expert_used(k)
                assert ctx.n_expert_used(topo.moe_layers[0]) == k
                logits, rec = routed(ctx, topo)
                for layer in topo.moe_layers:
                    assert rec.selections[layer].sum() == k * rec.tokens[layer]
                assert not np.array_equal(logits, base_logits)
            ctx.set_n_expert_used(0)  # back to the model's value: bit-identical again
            logits, rec = routed(ctx, topo)
            np.testing.assert_array_equal(logits, base_logits)
            # per layer
            first = topo.moe_layers[0]
            ctx.set_n_expert_used(1, layer=first)
            _, rec = routed(ctx, topo)
            assert rec.selections[first].sum() == rec.tokens[first]
            for layer in topo.moe_layers[1:]:
                assert rec.selections[layer].sum() == topo.n_expert_used * rec.tokens[layer]


def test_run_time_k_equals_load_time_override(synth_model):
    path = synth_model("qwen3moe", "f32")
    with MoEModel(path, n_ctx=256, n_threads=2, expert_used_count=1) as m1, m1.context() as c1:
        want = c1.decode([(0, PROMPT, 0)])[0]
    with MoEModel(path, n_ctx=256, n_threads=2) as m, m.context() as ctx:
        ctx.set_n_expert_used(1)
        got = ctx.decode([(0, PROMPT, 0)])[0]
    np.testing.assert_array_equal(got, want)


def test_experts_per_token_below_forced_is_refused(synth_model):
    with MoEModel(synth_model("qwen3moe", "f32"), n_ctx=256, n_threads=2) as m, m.context() as ctx:
        topo = m.topology
        layer = topo.moe_layers[0]
        ctx.set_profile(SteeringProfile.for_model(topo).force(layer, 0).force(layer, 1))
        with pytest.raises(_lib.SteeringCallError, match="forced"):
            ctx.set_n_expert_used(1)
        with pytest.raises(_lib.SteeringCallError):
            ctx.set_n_expert_used(topo.n_expert + 1)
        assert ctx.n_expert_used(layer) == topo.n_expert_used  # unchanged
        ctx.decode([(0, PROMPT, 0)])


def test_placement_rules():
    rules = Placement(("ffn_.*_exps=CPU,attn_q=CPU",), n_cpu_moe=2).rules(n_layer=4)
    assert rules[:2] == [("ffn_.*_exps", "CPU"), ("attn_q", "CPU")]
    assert [r[0] for r in rules[2:]] == [r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
                                         r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert Placement(cpu_moe=True).rules(4) == [(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps", "CPU")]
    for bad in ("noequals", "=CPU", "(unclosed=CPU"):
        with pytest.raises(OffloadError):
            Placement((bad,)).rules(4)


@pytest.mark.parametrize("placement", [Placement(cpu_moe=True), Placement(n_cpu_moe=1),
                                       Placement((r"blk\.1\.ffn_up_exps=CPU",))])
def test_offload_options_are_applied_and_harmless_on_cpu(synth_model, capfd, placement):
    path = synth_model("qwen3moe", "q8_0")
    with MoEModel(path, n_ctx=256, n_threads=2) as m, m.context() as ctx:
        want = ctx.generate(PROMPT, max_tokens=16).tokens
    capfd.readouterr()
    with MoEModel(path, n_ctx=256, n_threads=2, placement=placement, verbose=True) as m, m.context() as ctx:
        got = ctx.generate(PROMPT, max_tokens=16).tokens
    log = capfd.readouterr().err
    assert "ffn_up_exps.weight" in log and "buffer type overridden to CPU" in log
    assert got == want


def test_unknown_buffer_type_is_a_clear_error(synth_model):
    with pytest.raises(OffloadError, match="unknown buffer type 'NOPE'"):
        MoEModel(synth_model("qwen3moe", "q8_0"), placement=Placement(("exps=NOPE",)))


@pytest.mark.gpu
def test_cpu_moe_on_gpu_keeps_experts_in_host_memory(synth_model, capfd):
    path = synth_model("qwen3moe", "q8_0")
    with MoEModel(path, n_ctx=256, n_gpu_layers=-1) as m, m.context() as ctx:
        want = ctx.generate(PROMPT, max_tokens=32).tokens
    capfd.readouterr()
    with MoEModel(path, n_ctx=256, n_gpu_layers=-1, placement=Placement(cpu_moe=True), verbose=True) as m, \
            m.context() as ctx:
        got = ctx.generate(PROMPT, max_tokens=32).tokens
    log = capfd.readouterr().err
    assert log.count("buffer type overridden to CPU") == 3 * len(m.topology.moe_layers)
    assert got == want
