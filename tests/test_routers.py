"""Layers that route twice (grovemoe) and models that decode through llama_encode (llada-moe), on the real
patched llama.cpp with synthetic GGUFs (moe_gguf.formats.synth's tiny-grovemoe and tiny-llada-moe)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gguf.engine.model import MoEModel
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecord, RoutingRecorder

pytestmark = pytest.mark.native

PROMPT = list(range(40, 72))  # 32 byte-level tokens


@pytest.fixture(scope="module")
def models(synth_model):
    loaded: dict = {}

    def get(arch: str) -> MoEModel:
        if arch not in loaded:
            loaded[arch] = MoEModel(synth_model(arch), n_ctx=256, n_threads=2)
        return loaded[arch]

    yield get
    for m in loaded.values():
        m.close()


def record(model: MoEModel, profile: SteeringProfile | None = None) -> RoutingRecorder:
    topo = model.topology
    rec = RoutingRecorder(topo.n_layer, topo.n_expert, traces=True)
    with model.context(n_batch=256) as ctx:
        ctx.set_profile(profile, seq_id=0)
        with ctx.recording(rec):
            ctx.decode([(0, PROMPT, 0)], logits="all")
    return rec


def test_grovemoe_reports_each_router_apart(models):
    model = models("grovemoe")
    topo = model.topology
    rec = record(model).record
    n, k = len(PROMPT), topo.n_expert_used
    assert rec.router1 is not None
    n_chunk = topo.n_expert // 2  # tiny-grovemoe: 2 experts per chunk expert
    assert rec.router1.selections.shape == (topo.n_layer, n_chunk)
    for layer in range(topo.n_layer):
        # one count per token and router: before the router field, both selections landed in router 0's row
        assert rec.tokens[layer] == n and rec.router1.tokens[layer] == n
        assert rec.selections[layer].sum() == n * k
        assert rec.router1.selections[layer].sum() == n * k


def test_grovemoe_router1_picks_the_chunks_of_router0s_experts(models):
    """grovemoe's second selection is the first one's top-k mapped to chunk experts (expert // 2)."""
    rec = record(models("grovemoe"))
    by_key: dict = {}
    for t in rec.traces:
        by_key.setdefault((t.layer, t.pos), {})[t.router] = t.experts
    assert len(by_key) == models("grovemoe").topology.n_layer * len(PROMPT)
    for routers in by_key.values():
        assert np.array_equal(np.sort(routers[0] // 2), np.sort(routers[1]))


def test_grovemoe_steering_applies_to_router0_only(models):
    model = models("grovemoe")
    topo = model.topology
    plain = record(model).record
    target = int(np.argmax(plain.selections[0]))
    profile = SteeringProfile.for_model(topo, name="off").disable(0, target)
    steered = record(model, profile).record
    assert plain.selections[0, target] > 0 and steered.selections[0, target] == 0
    assert steered.selections[0].sum() == len(PROMPT) * topo.n_expert_used
    # router 1 still routes every token (its logits are the layer's unsteered router output)
    assert steered.router1.tokens[0] == len(PROMPT)


def test_grovemoe_record_round_trips_and_merges(models, tmp_path):
    rec = record(models("grovemoe")).record
    back = RoutingRecord.load(rec.save(tmp_path / "g.npz"))
    assert back.router1 is not None and np.array_equal(back.router1.selections, rec.router1.selections)
    other = record(models("grovemoe")).record  # another run: merging the same run twice is refused
    both = back + other
    assert np.array_equal(both.router1.tokens, rec.router1.tokens + other.router1.tokens)
    assert np.array_equal(both.router1.selections, rec.router1.selections + other.router1.selections)
    assert np.array_equal(both.selections, rec.selections + other.selections)


def test_record_without_a_second_router_loads_as_before(tmp_path):
    rec = RoutingRecord(2, 8)
    rec.selections[1, 3] = 5
    rec.tokens[1] = 5
    back = RoutingRecord.load(rec.save(tmp_path / "plain.npz"))
    assert back.router1 is None and back.selections[1, 3] == 5
    with np.load(tmp_path / "plain.npz") as z:
        assert not any(name.startswith("router1_") for name in z.files)


def test_llada_moe_capture_through_encode(models):
    """Diffusion LMs have no KV cache: llama_decode runs llama_encode, which now reports the routing."""
    model = models("llada-moe")
    topo = model.topology
    rec = record(model).record
    for layer in range(topo.n_layer):
        assert rec.tokens[layer] == len(PROMPT)
        assert rec.selections[layer].sum() == len(PROMPT) * topo.n_expert_used
    assert rec.router1 is None


def test_llada_moe_disabled_expert_never_selected(models):
    model = models("llada-moe")
    topo = model.topology
    plain = record(model).record
    target = int(np.argmax(plain.selections[1]))
    steered = record(model, SteeringProfile.for_model(topo, name="off").disable(1, target)).record
    assert plain.selections[1, target] > 0 and steered.selections[1, target] == 0
