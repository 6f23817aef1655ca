"""SteerContext after a generation: a later decode works or names the real cause, and no steering is left behind."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gguf import MoEModel, Request
from moe_gguf.errors import DecodeError
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecorder

pytestmark = pytest.mark.native

PROMPT = list(range(40, 72))


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe"), n_ctx=512, n_threads=2)
    yield m
    m.close()


def _record(ctx, model) -> RoutingRecorder:
    rec = RoutingRecorder(model.topology.n_layer, model.topology.n_expert)
    with ctx.recording(rec):
        ctx.decode([(0, PROMPT, 0)], logits="all")
    return rec


def test_decode_after_generate_many_is_fresh_and_unsteered(model):
    """The README's API example: record sequence 0 after an A/B generate_many with a profile on sequence 0."""
    layer = model.topology.moe_layers[0]
    with model.context(n_seq_max=2) as ctx:
        baseline = _record(ctx, model).record
        ctx.clear_memory()
    profile = SteeringProfile.for_model(model.topology).disable(layer, int(baseline.selections[layer].argmax()))
    with model.context(n_seq_max=2) as ctx:
        steered, plain = ctx.generate_many([Request(PROMPT, profile, max_tokens=4), Request(PROMPT, max_tokens=4)])
        after = _record(ctx, model).record
    assert np.array_equal(after.selections, baseline.selections)  # unsteered, and the whole prompt recorded afresh
    assert after.selections[layer][int(baseline.selections[layer].argmax())] > 0


def test_decode_onto_a_cached_sequence_names_the_cause(model):
    with model.context(n_seq_max=2) as ctx:
        list(ctx.stream([Request(PROMPT, max_tokens=3)]))  # stream keeps the cache (for reuse_prefix)
        with pytest.raises(DecodeError) as e:
            ctx.decode([(0, PROMPT, 0)])
        msg = str(e.value)
        assert "sequence 0 still holds positions up to" in msg and "clear_memory(0)" in msg
        assert "full" not in msg
        ctx.clear_memory(0)
        ctx.decode([(0, PROMPT, 0)])  # the fix the message names works


def test_stream_leaves_no_per_sequence_steering(model):
    layer = model.topology.moe_layers[0]
    with model.context(n_seq_max=1) as ctx:
        base = ctx.decode([(0, PROMPT, 0)])[0]
        ctx.clear_memory()
        profile = SteeringProfile.for_model(model.topology)
        for e in range(model.topology.n_expert // 2):
            profile.disable(layer, e)
        list(ctx.stream([Request(PROMPT, profile, max_tokens=2)]))
        ctx.clear_memory()
        assert np.array_equal(ctx.decode([(0, PROMPT, 0)])[0], base)


def test_stream_returns_sequences_to_the_context_default_profile(model):
    layer = model.topology.moe_layers[0]
    profile = SteeringProfile.for_model(model.topology)
    for e in range(model.topology.n_expert // 2):
        profile.disable(layer, e)
    with model.context(n_seq_max=1) as ctx:
        ctx.set_profile(profile)  # every sequence
        steered = ctx.decode([(0, PROMPT, 0)])[0]
        ctx.clear_memory()
        list(ctx.stream([Request(PROMPT, None, max_tokens=2)]))  # sequence 0 unsteered while streaming
        ctx.clear_memory()
        assert np.array_equal(ctx.decode([(0, PROMPT, 0)])[0], steered)
