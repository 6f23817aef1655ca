"""Router steering and routing capture on the real patched llama.cpp, every synthetic architecture.

Routing is checked two ways: moe-gguf's capture callback and, independently, llama.cpp's own
cb_eval graph callback reading ffn_moe_topk-<layer>.
"""

from __future__ import annotations

import numpy as np
import pytest

from moe_gguf.engine.cbeval import TopkTap
from moe_gguf.engine.model import MoEModel
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecorder

from .conftest import ARCHS, DTYPES

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp

PROMPT = list(range(40, 104))  # 64 tokens, byte-level ids


@pytest.fixture(scope="module")
def models(synth_model):
    loaded: dict = {}

    def get(arch: str, dtype: str) -> MoEModel:
        if (arch, dtype) not in loaded:
            loaded[(arch, dtype)] = MoEModel(synth_model(arch, dtype), n_ctx=512, n_threads=2)
        return loaded[(arch, dtype)]

    yield get
    for m in loaded.values():
        m.close()


def run(model: MoEModel, profile: SteeringProfile | None = None, *, n_seq: int = 1, steer_seqs=(0,)):
    """Decode PROMPT in n_seq sequences; returns (logits per seq [T, V], record, cb_eval tap)."""
    tap = TopkTap()
    topo = model.topology
    with model.context(n_seq_max=n_seq, n_batch=256, cb_eval=tap.callback) as ctx:
        for s in steer_seqs:
            ctx.set_profile(profile, seq_id=s)
        rec = RoutingRecorder(topo.n_layer, topo.n_expert, traces=True)
        with ctx.recording(rec):
            logits = ctx.decode([(s, PROMPT, 0) for s in range(n_seq)], logits="all")
    return logits, rec, tap


def busiest(rec: RoutingRecorder, layer: int) -> int:
    return int(np.argmax(rec.record.selections[layer]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_cb_eval(models, arch, dtype):
    m = models(arch, dtype)
    _, rec, tap = run(m)
    topo = m.topology
    assert rec.record.tokens[list(topo.moe_layers)].min() == len(PROMPT)  # all tokens, all MoE layers
    np.testing.assert_array_equal(rec.record.selections, tap.counts(topo.n_layer, topo.n_expert))
    assert rec.record.selections.sum() == len(PROMPT) * topo.n_expert_used * len(topo.moe_layers)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_expert_never_selected(models, arch, dtype):
    m = models(arch, dtype)
    topo = m.topology
    _, base, _ = run(m)
    prof = SteeringProfile.for_model(topo)
    victims = {layer: busiest(base, layer) for layer in topo.moe_layers}
    for layer, e in victims.items():
        prof.disable(layer, e)
    _, rec, tap = run(m, prof)
    seen = tap.counts(topo.n_layer, topo.n_expert)
    for layer, e in victims.items():
        assert base.record.selections[layer, e] > 0
        assert rec.record.selections[layer, e] == 0
        assert seen[layer, e] == 0
    # the slots were filled by other experts: still n_expert_used per token
    assert rec.record.selections.sum() == base.record.selections.sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_forced_expert_always_selected_with_top_weight(models, arch, dtype):
    m = models(arch, dtype)
    topo = m.topology
    _, base, _ = run(m)
    layer = topo.moe_layers[-1]
    e = int(np.argmin(base.record.selections[layer]))  # the least used expert
    _, rec, tap = run(m, SteeringProfile.for_model(topo).force(layer, e))
    assert rec.record.selections[layer, e] == len(PROMPT)
    assert all((ids == e).any(axis=1).all() for ids in tap.topk[layer])
    for t in (t for t in rec.traces if t.layer == layer):
        w = t.weights[t.experts == e][0]
        assert w >= t.weights.max() - 1e-6  # the token's highest weight


@pytest.mark.parametrize("arch", ARCHS)
def test_no_profile_is_bit_identical_and_adds_no_nodes(models, arch):
    m = models(arch, "q8_0")
    topo = m.topology
    before, _, tap0 = run(m)
    prof = SteeringProfile.for_model(topo).disable(topo.moe_layers[0], 0)
    steered, _, tap1 = run(m, prof)
    assert tap1.n_asked > tap0.n_asked  # steering adds nodes only while a profile is in use
    assert not np.array_equal(before[0], steered[0])
    # set, then clear on the same context: logits and graph size back to the unsteered ones
    tap = TopkTap()
    with m.context(n_batch=256, cb_eval=tap.callback) as ctx:
        ctx.set_profile(prof)
        ctx.decode([(0, PROMPT, 0)], logits="none")
        ctx.clear_memory()
        ctx.set_profile(None)
        n = tap.n_asked
        after = ctx.decode([(0, PROMPT, 0)], logits="all")
        assert tap.n_asked - n == tap0.n_asked
    np.testing.assert_array_equal(before[0], after[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sequence_steering_leaves_other_sequences_exact(models, arch):
    m = models(arch, "f32")
    topo = m.topology
    prof = SteeringProfile.for_model(topo)
    for layer in topo.moe_layers:
        prof.disable(layer, 0).disable(layer, 1)
    plain, _, _ = run(m, None, n_seq=2, steer_seqs=())
    ab, rec, _ = run(m, prof, n_seq=2, steer_seqs=(0,))
    np.testing.assert_array_equal(ab[1], plain[1])  # unsteered sequence: exactly unchanged
    assert not np.allclose(ab[0], plain[0])        # steered sequence: changed
    for t in rec.traces:
        if t.seq_id == 0:
            assert not np.isin(t.experts, [0, 1]).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_bias_moves_selection_in_its_direction(models, arch):
    m = models(arch, "f32")
    topo = m.topology
    _, base, _ = run(m)
    layer = topo.moe_layers[0]
    e_rare, e_common = int(np.argmin(base.record.selections[layer])), busiest(base, layer)
    _, up, _ = run(m, SteeringProfile.for_model(topo).bias(layer, e_rare, 4.0))
    _, down, _ = run(m, SteeringProfile.for_model(topo).bias(layer, e_common, -4.0))
    assert up.record.selections[layer, e_rare] > base.record.selections[layer, e_rare]
    assert down.record.selections[layer, e_common] < base.record.selections[layer, e_common]


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_multiplies_the_routing_weight(models, arch):
    m = models(arch, "f32")
    topo = m.topology
    _, base, _ = run(m)
    layer = topo.moe_layers[0]
    e = busiest(base, layer)
    logits0, _, _ = run(m)
    logits, rec, _ = run(m, SteeringProfile.for_model(topo).scale(layer, e, 3.0))
    # in the scaled layer: selection unchanged, the expert's weight x3, other weights unchanged
    np.testing.assert_array_equal(rec.record.selections[layer], base.record.selections[layer])
    np.testing.assert_allclose(rec.record.weight_sum[layer, e], 3.0 * base.record.weight_sum[layer, e], rtol=1e-5)
    others = np.arange(topo.n_expert) != e
    np.testing.assert_allclose(rec.record.weight_sum[layer, others], base.record.weight_sum[layer, others], rtol=1e-6)
    assert not np.allclose(logits[0], logits0[0])


def test_sigmoid_selection_bias_cannot_bring_back_a_disabled_expert(models):
    """deepseek2: sigmoid gating + exp_probs_b; disable the expert the bias favours most."""
    import gguf

    m = models("deepseek2", "f32")
    topo = m.topology
    reader = gguf.GGUFReader(str(m.path))
    layer = topo.moe_layers[0]
    bias = next(np.array(t.data) for t in reader.tensors if t.name == f"blk.{layer}.exp_probs_b.bias")
    e = int(np.argmax(bias))
    _, base, _ = run(m)
    assert base.record.selections[layer, e] > 0
    _, rec, _ = run(m, SteeringProfile.for_model(topo).disable(layer, e))
    assert rec.record.selections[layer, e] == 0


def test_capture_of_pruned_last_layer_and_all_tokens(models):
    """Only the last token's output requested: the last layer routes only that token."""
    m = models("qwen3moe", "f32")
    topo = m.topology
    rec = RoutingRecorder(topo.n_layer, topo.n_expert)
    with m.context(n_batch=256) as ctx, ctx.recording(rec):
        ctx.decode([(0, PROMPT, 0)], logits="last")
    last = topo.moe_layers[-1]
    assert rec.record.tokens[last] == 1
    assert rec.record.tokens[topo.moe_layers[0]] == len(PROMPT)


def test_values_change_without_rebuild_but_results_follow(models):
    m = models("qwen3moe", "f32")
    topo = m.topology
    layer = topo.moe_layers[0]
    with m.context(n_batch=256) as ctx:
        outs = []
        for v in (2.0, -2.0, 2.0):
            ctx.set_profile(SteeringProfile.for_model(topo).bias(layer, 0, v))
            ctx.clear_memory()
            outs.append(ctx.decode([(0, PROMPT, 0)])[0])
    assert not np.array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_zero_ablates_in_place(models, arch):
    """scale 0: the expert keeps its slot (selection unchanged) but contributes nothing."""
    m = models(arch, "f32")
    topo = m.topology
    _, base, _ = run(m)
    layer = topo.moe_layers[0]
    e = busiest(base, layer)
    _, rec, _ = run(m, SteeringProfile.for_model(topo).scale(layer, e, 0.0))
    np.testing.assert_array_equal(rec.record.selections[layer], base.record.selections[layer])
    assert rec.record.weight_sum[layer, e] == 0.0


def test_profiles_no_sequence_uses_are_dropped(models):
    m = models("qwen3moe", "f32")
    topo = m.topology
    with m.context(n_seq_max=2) as ctx:
        for i in range(20):
            ctx.set_profile(SteeringProfile.for_model(topo).bias(topo.moe_layers[0], i % topo.n_expert, 1.0), seq_id=0)
        ctx.set_profile(SteeringProfile.for_model(topo).disable(topo.moe_layers[0], 1), seq_id=1)
        assert len(ctx._steering._profiles) == 2
        ctx.set_profile(None)
        assert ctx._steering._profiles == {}


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_steered_graphs_are_reused_and_equal_rebuilt_ones(models, monkeypatch, arch):
    """Token-by-token decoding with a profile reuses the graph (the steering values are uploaded again for every
    ubatch), and gives bit for bit what a context rebuilding every graph (LLAMA_GRAPH_REUSE_DISABLE=1) gives,
    including after a profile's values change between tokens."""
    from llama_cpp import llama_cpp as low

    m = models(arch, "f32")
    topo = m.topology
    _, base, _ = run(m)
    first, last = topo.moe_layers[0], topo.moe_layers[-1]
    prof = SteeringProfile.for_model(topo).disable(first, busiest(base, first)).bias(last, 1, 2.0).scale(last, 2, 0.5)

    def decode(reuse: bool, edit: bool = True) -> tuple[list[np.ndarray], int]:
        if reuse:
            monkeypatch.delenv("LLAMA_GRAPH_REUSE_DISABLE", raising=False)
        else:
            monkeypatch.setenv("LLAMA_GRAPH_REUSE_DISABLE", "1")
        out = []
        with m.context(n_seq_max=2, n_batch=256) as ctx:
            ctx.set_profile(prof, seq_id=1)
            last_logits = ctx.decode([(0, PROMPT[:16], 0), (1, PROMPT[:16], 0)])
            for step in range(12):
                if step == 6 and edit:  # same layers and kinds, other values: no new topology
                    edited = SteeringProfile.for_model(topo).disable(first, busiest(base, first)) \
                        .bias(last, 1, -3.0).scale(last, 2, 1.5)
                    ctx.set_profile(edited, seq_id=1)
                toks = {s: int(np.argmax(last_logits[s])) for s in (0, 1)}
                last_logits = ctx.decode([(s, [toks[s]], 16 + step) for s in (0, 1)])
                out += [last_logits[0].copy(), last_logits[1].copy()]
            n_reused = low.llama_perf_context(ctx.ctx).n_reused
        return out, n_reused

    reused, n_reused = decode(True)
    rebuilt, n_rebuilt = decode(False)
    assert n_reused >= 8 and n_rebuilt == 0
    for a, b in zip(reused, rebuilt, strict=True):
        np.testing.assert_array_equal(a, b)
    # the edit reached the reused graphs: the steered sequence's logits after it differ from a run without it
    unedited, _ = decode(True, edit=False)
    assert all(np.array_equal(a, b) for a, b in zip(reused[:12], unedited[:12], strict=True))
    assert not np.array_equal(reused[-1], unedited[-1]) and np.array_equal(reused[-2], unedited[-2])
