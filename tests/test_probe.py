"""Probing: per-label counts, token modes, resume after interruption, merge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import CountFileError
from moe_gguf.study.probe import ProbeInputError, ProbeResult, load_jsonl, parse_item, probe

ITEMS = [parse_item({"prompt": f"request number {i} about topic {i % 3}", "label": "a" if i % 2 else "b",
                     "response": f"answer {i}", "pair_id": i // 2}, where="test") for i in range(10)]


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe", "q8_0"), n_ctx=512, n_threads=2)
    yield m
    m.close()


@pytest.mark.native
def test_counts_per_label_and_item(model):
    res = probe(model, ITEMS, n_seq=4)
    topo = model.topology
    assert res.labels == ["a", "b"]
    assert res.item_maps.shape == (10, topo.n_layer, topo.n_expert)
    for lab in res.labels:
        idx = [i for i, x in enumerate(res.item_labels) if x == lab]
        np.testing.assert_array_equal(res.item_maps[idx].sum(0), res.records[lab].selections)
    # every prompt token counted once per MoE layer, k experts each
    layer = topo.moe_layers[0]
    assert (res.item_maps[:, layer].sum(1) == res.item_tokens[:, layer] * topo.n_expert_used).all()


@pytest.mark.native
def test_batching_does_not_change_counts(model):
    a, b = probe(model, ITEMS, n_seq=1), probe(model, ITEMS, n_seq=5)
    np.testing.assert_array_equal(a.item_maps, b.item_maps)


@pytest.mark.native
def test_token_modes_count_different_tokens(model):
    p = probe(model, ITEMS[:4], token_mode="prompt")
    r = probe(model, ITEMS[:4], token_mode="response")
    g = probe(model, ITEMS[:4], token_mode="generated", max_new_tokens=5)
    layer = model.topology.moe_layers[0]
    n_resp = [len(model.tokenize(it.response, add_bos=False)) for it in ITEMS[:4]]
    assert list(r.item_tokens[:, layer]) == n_resp
    assert (g.item_tokens[:, layer] <= 5).all() and (g.item_tokens[:, layer] >= 1).all()
    assert (p.item_tokens[:, layer] > r.item_tokens[:, layer]).all()


@pytest.mark.native
def test_interrupted_probe_resumes_to_the_exact_counts(model, tmp_path):
    full = probe(model, ITEMS, n_seq=3)
    out = tmp_path / "p.npz"

    class Stop(Exception):
        pass

    def stop_after_two(done, total):
        if done >= 6:
            raise Stop

    with pytest.raises(Stop):
        probe(model, ITEMS, n_seq=3, out=out, progress=stop_after_two)
    assert len(ProbeResult.load(out).item_labels) == 6
    resumed = probe(model, ITEMS, n_seq=3, out=out)
    np.testing.assert_array_equal(resumed.item_maps, full.item_maps)
    for lab in full.labels:
        np.testing.assert_array_equal(resumed.records[lab].selections, full.records[lab].selections)
    # other inputs: the old file is not reused; it is refused, or replaced when asked to
    with pytest.raises(CountFileError, match="--overwrite"):
        probe(model, ITEMS[:2], n_seq=3, out=out)
    other = probe(model, ITEMS[:2], n_seq=3, out=out, overwrite=True)
    assert len(other.item_labels) == 2


@pytest.mark.native
def test_merge_of_parts_equals_the_whole(model, tmp_path):
    whole = probe(model, ITEMS)
    parts = probe(model, ITEMS[:4]) + probe(model, ITEMS[4:])
    for lab in whole.labels:
        np.testing.assert_array_equal(parts.records[lab].selections, whole.records[lab].selections)
        np.testing.assert_array_equal(parts.records[lab].tokens, whole.records[lab].tokens)
    np.testing.assert_array_equal(parts.item_maps, whole.item_maps)
    parts.save(tmp_path / "m.npz")
    back = ProbeResult.load(tmp_path / "m.npz")
    assert back.item_labels == whole.item_labels


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "x", "label": "a"}) + "\n" + '{"prompt": 3, "label": "a"}\n')
    with pytest.raises(ProbeInputError, match=r"d\.jsonl:2: 'prompt'"):
        load_jsonl(p)
    p.write_text("{not json}\n")
    with pytest.raises(ProbeInputError, match=r"d\.jsonl:1: not valid JSON"):
        load_jsonl(p)
    p.write_text('{"prompt": "x", "label": "a"}\n{"prompt": "y", "label": "a", "chat": "yes"}\n')
    with pytest.raises(ProbeInputError, match=r"d\.jsonl:2: 'chat' must be true or false"):
        load_jsonl(p)


def test_extra_fields_are_metadata_not_errors(tmp_path):
    """A user's file with a 'category' on each line (and answer/target) loads; the extras are kept."""
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "x", "label": "forbidden", "response": "I cannot help.", "category": "weapons",
                             "answer": 42, "target": "Sure.", "pair_id": 7, "id": {"k": 1}}) + "\n")
    (it,) = load_jsonl(p)
    assert (it.label, it.response, it.answer, it.target, it.pair_id) == ("forbidden", "I cannot help.", "42", "Sure.", "7")
    assert it.meta == {"category": "weapons", "id": {"k": 1}}
    p.write_text(json.dumps({"prompt": "x", "label": "a", "answer": [1]}) + "\n")
    with pytest.raises(ProbeInputError, match=r"d\.jsonl:1: 'answer' must be a string or a number"):
        load_jsonl(p)


@pytest.mark.native
def test_response_mode_needs_responses(model):
    with pytest.raises(ProbeInputError, match="response"):
        probe(model, [parse_item({"prompt": "x", "label": "a"}, where="t")], token_mode="response")
