"""Steering schedules: whole prompt, generated tokens only, after N tokens, after a text."""

from __future__ import annotations

import pytest

from moe_gguf.model import MoEModel, Request
from moe_gguf.profile import Schedule, SteeringProfile

PROMPT = list(range(70, 90))


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe", "f32"), n_ctx=512, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="module")
def profile(model):
    topo = model.topology
    p = SteeringProfile.for_model(topo)
    for layer in topo.moe_layers:
        for e in range(topo.n_expert - topo.n_expert_used):
            p.disable(layer, e)
    return p


def gen(model, profile, schedule, n=24):
    with model.context(n_seq_max=1) as ctx:
        return ctx.generate(PROMPT, profile=profile, max_tokens=n, schedule=schedule)


def test_schedules(model, profile):
    plain = gen(model, None, None)
    everything = gen(model, profile, Schedule("all"))
    generated = gen(model, profile, Schedule("generated"))
    later = gen(model, profile, Schedule("generated", after_tokens=8))
    assert everything.steered_from == 0 and generated.steered_from == 0
    assert everything.tokens != plain.tokens
    assert generated.tokens != plain.tokens
    # after 8 tokens: identical to the unsteered run up to there, then it may diverge
    assert later.steered_from == 8
    assert later.tokens[:8] == plain.tokens[:8]
    assert later.tokens != plain.tokens


def test_after_text(model, profile):
    plain = gen(model, None, None)
    trigger = model.detokenize(plain.tokens[:5])
    out = gen(model, profile, Schedule("generated", after_text=trigger))
    assert out.steered_from == 5
    assert out.tokens[:5] == plain.tokens[:5]
    never = gen(model, profile, Schedule("generated", after_text="\x00never"))
    assert never.steered_from is None and never.tokens == plain.tokens


def test_ab_in_one_batch_matches_separate_runs(model, profile):
    with model.context(n_seq_max=2) as ctx:
        steered, plain = ctx.generate_many([Request(PROMPT, profile, 16), Request(PROMPT, None, 16)])
    assert plain.tokens == gen(model, None, None, 16).tokens
    assert steered.tokens == gen(model, profile, Schedule("all"), 16).tokens
