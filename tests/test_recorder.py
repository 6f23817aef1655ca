"""Routing records: additive, saved and loaded exactly, token filters."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gguf.engine.model import MoEModel
from moe_gguf.formats.records import RoutingRecord, RoutingRecorder

PROMPT = list(range(60, 92))


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("gpt-oss", "q8_0"), n_ctx=256, n_threads=2)
    yield m
    m.close()


def record(model, prompts, token_filter=None) -> RoutingRecord:
    topo = model.topology
    rec = RoutingRecorder(topo.n_layer, topo.n_expert, token_filter=token_filter, meta={"model": topo.fingerprint()})
    with model.context(n_seq_max=len(prompts), n_batch=256) as ctx, ctx.recording(rec):
        ctx.decode([(s, p, 0) for s, p in enumerate(prompts)], logits="all")
    return rec.record


@pytest.mark.native
def test_records_add_up_exactly_and_survive_save_load(model, tmp_path):
    a, b = PROMPT[:16], PROMPT[16:]
    both = record(model, [a, b])
    merged = record(model, [a]) + record(model, [b])
    np.testing.assert_array_equal(merged.selections, both.selections)
    np.testing.assert_array_equal(merged.tokens, both.tokens)
    np.testing.assert_allclose(merged.weight_sum, both.weight_sum, rtol=1e-6)
    path = merged.save(tmp_path / "counts.npz")
    back = RoutingRecord.load(path)
    np.testing.assert_array_equal(back.selections, merged.selections)
    np.testing.assert_array_equal(back.weight_sum, merged.weight_sum)
    assert back.meta["model"] == model.topology.fingerprint()


@pytest.mark.native
def test_token_filter_counts_only_chosen_positions(model):
    full = record(model, [PROMPT])
    head = record(model, [PROMPT], token_filter=lambda seq, pos: pos < 10)
    layer = model.topology.moe_layers[0]
    assert head.tokens[layer] == 10 and full.tokens[layer] == len(PROMPT)
    assert head.selections[layer].sum() == 10 * model.topology.n_expert_used


def test_merging_records_of_different_shapes_or_models_fails():
    a = RoutingRecord(2, 4, meta={"model": {"arch": "x"}})
    with pytest.raises(ValueError, match="shape"):
        a + RoutingRecord(2, 8)
    with pytest.raises(ValueError, match="different models"):
        a + RoutingRecord(2, 4, meta={"model": {"arch": "y"}})


def test_corrupt_record_file(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="x.npz"):
        RoutingRecord.load(p)
