"""Contexts and models are freed once, contexts before their model, whatever order Python finalizes them in.

The ASan run (scripts/sanitize.sh) is what sees a use-after-free; here the behaviour around it is pinned
down: a closed context or model is refused with a clear error instead of touching freed memory.
"""

from __future__ import annotations

import gc

import pytest

from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import ContextClosedError
from moe_gguf.formats.profile import SteeringProfile

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp


@pytest.fixture
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe"), n_ctx=128, n_threads=1)
    yield m
    m.close()


def test_closing_the_model_frees_its_contexts_first(model):
    ctx = model.context(n_seq_max=2)
    out = ctx.decode([(0, [1, 2, 3], 0)])
    assert out[0].shape == (ctx.n_vocab,)
    model.close()
    assert ctx.closed
    with pytest.raises(ContextClosedError):
        ctx.decode([(0, [4], 3)])
    with pytest.raises(ContextClosedError):
        ctx.set_profile(SteeringProfile.for_model(model.topology).disable(0, 1))
    with pytest.raises(ContextClosedError):
        ctx.clear_memory()
    ctx.close()  # a no-op, not a double free
    for call in (model.context, lambda: model.tokenize("a"), lambda: model.steer(None)):
        with pytest.raises(ContextClosedError, match="closed"):
            call()


def test_a_closed_context_is_refused(model):
    ctx = model.context()
    ctx.close()
    ctx.close()
    with pytest.raises(ContextClosedError):
        ctx.decode([(0, [1, 2], 0)])
    with pytest.raises(ContextClosedError):
        ctx.set_n_expert_used(1)
    # the model and its other contexts are unaffected
    other = model.context()
    assert other.decode([(0, [1, 2], 0)])[0].shape == (other.n_vocab,)
    other.close()


def test_model_and_context_in_one_garbage_cycle():
    """The case the ASan suite caught: a GC cycle finalized the model before a context still open on it."""
    import tempfile
    from pathlib import Path

    from moe_gguf.formats.synth import PRESETS, write_gguf

    with tempfile.TemporaryDirectory() as d:
        path = write_gguf(PRESETS["tiny-qwen3moe"], Path(d) / "m.gguf", dtype="f32")
        for _ in range(5):
            m = MoEModel(path, n_ctx=64, n_threads=1)
            ctxs = [m.context() for _ in range(3)]
            ctxs[0].decode([(0, [1, 2, 3], 0)])
            m.cycle = ctxs  # model -> contexts -> model
            del m, ctxs
            gc.collect()
    # a steered model made afterwards works
    with tempfile.TemporaryDirectory() as d:
        path = write_gguf(PRESETS["tiny-qwen3moe"], Path(d) / "m.gguf", dtype="f32")
        with MoEModel(path, n_ctx=64, n_threads=1) as m, m.context() as ctx:
            assert ctx.decode([(0, [1, 2, 3], 0)])[0].shape == (ctx.n_vocab,)
