"""Steering schedules: whole prompt, generated tokens only, after N tokens, after a text."""

from __future__ import annotations

import pytest

from moe_gguf.engine.context import Request
from moe_gguf.engine.model import MoEModel
from moe_gguf.formats.profile import Schedule, SteeringProfile

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp

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


def _chat(ctx, turns, requests_for, reuse):
    """Turns of a chat: each prompt is the previous prompt + reply + a new user message (as the TUI builds it).
    Returns the replies per turn and the tokens routed in layer 0 per turn (what was decoded)."""
    from moe_gguf.formats.records import RoutingRecorder

    topo = ctx.model.topology
    history: list[list[int]] = []
    replies, routed = [], []
    prompt: list[int] = list(PROMPT)
    for t in range(turns):
        reqs = requests_for(t, prompt)
        rec = RoutingRecorder(topo.n_layer, topo.n_expert)
        with ctx.recording(rec):
            outs = ctx.generate_many(reqs) if not reuse else \
                [ev for ev in ctx.stream(reqs, reuse_prefix=True)][-1].completions
        replies.append([o.tokens for o in outs])
        routed.append(int(rec.record.tokens[topo.moe_layers[0]]))
        history.append(outs[0].tokens)
        prompt = prompt + outs[0].tokens + [7 + t, 8 + t, 9 + t]  # the next user message
    return replies, routed


@pytest.mark.parametrize("case", ["unsteered", "steered", "compare", "profile_changes", "scheduled"])
def test_chat_turns_reuse_the_prefix_and_match_a_full_recompute(model, profile, case):
    other = SteeringProfile.for_model(model.topology).disable(model.topology.moe_layers[0], 0)

    def requests_for(t, prompt):
        n = 8
        if case == "unsteered":
            return [Request(prompt, None, n)]
        if case == "steered":
            return [Request(prompt, profile, n)]
        if case == "compare":  # steered and unsteered side by side, as the TUI's compare mode
            return [Request(prompt, profile, n), Request(prompt, None, n)]
        if case == "profile_changes":
            return [Request(prompt, profile if t % 2 == 0 else other, n)]
        return [Request(prompt, profile, n, schedule=Schedule("generated"))]

    with model.context(n_seq_max=2, n_ctx=512) as a, model.context(n_seq_max=2, n_ctx=512) as b:
        full, routed_full = _chat(a, 3, requests_for, reuse=False)
        reused, routed_reused = _chat(b, 3, requests_for, reuse=True)
    assert reused == full
    n_seq = 2 if case == "compare" else 1
    if case in ("unsteered", "steered", "compare"):
        # from the second turn on only the new tokens are decoded: the reply fed back and the new message
        assert routed_reused[0] == routed_full[0]
        for t in (1, 2):
            assert routed_reused[t] < routed_full[t] / 2
            assert routed_reused[t] <= n_seq * (8 + 3 + 8)
    else:  # other steering than the cached tokens had: everything decoded again
        assert routed_reused == routed_full


def test_changing_experts_per_token_ends_prefix_reuse(model):
    from moe_gguf.formats.records import RoutingRecorder

    topo = model.topology
    with model.context(n_seq_max=1, n_ctx=512) as ctx:
        list(ctx.stream([Request(PROMPT, None, 4)], reuse_prefix=True))
        ctx.set_n_expert_used(1)
        rec = RoutingRecorder(topo.n_layer, topo.n_expert)
        with ctx.recording(rec):
            list(ctx.stream([Request(PROMPT + [5, 6], None, 1)], reuse_prefix=True))
    assert rec.record.tokens[topo.moe_layers[0]] == len(PROMPT) + 2  # all decoded again, with one expert
    assert rec.record.selections[topo.moe_layers[0]].sum() == len(PROMPT) + 2
