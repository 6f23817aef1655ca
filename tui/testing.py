"""Helpers for driving the chat app in tests (Textual pilot): wait for the model, wait for a reply."""

from __future__ import annotations

import asyncio
import time

from moe_gguf.tui.config import Sampling

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, seed=0)


async def wait_for(pilot, condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def wait_ready(pilot, timeout: float = 20.0) -> None:
    """Until the model is loaded (or failed to load) and the UI has caught up."""
    app = pilot.app
    await wait_for(pilot, lambda: not any(w.group == "load" and not w.is_finished for w in app.workers),
                   timeout, "the model to load")
    await pilot.pause()


async def wait_idle(pilot, timeout: float = 30.0) -> None:
    """Until the current reply is finished and shown."""
    chat = pilot.app.chat
    await asyncio.sleep(0)
    await wait_for(pilot, lambda: not chat.generating, timeout, "the reply")
    await pilot.pause()


async def send(pilot, text: str) -> None:
    """Type `text` in the input and press Enter, then wait for the reply."""
    chat = pilot.app.chat
    n = len(chat.turns)
    chat_input = chat.query_one("#input")
    chat_input.focus()
    chat_input.load_text(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(chat.turns) >= n + 2 and not chat.generating, 30.0, "the reply")
    await pilot.pause()


# -- a tiny "reasoning" model -------------------------------------------------------------------------------------

# the reply the thinking model gives to any chat prompt (greedy, and at any usual temperature): each token is the
# successor of the one before, so every token of the chain is a different vocabulary entry
THINKING_CHAIN = ("<think>", "Ġw", "he", "n", "?", "</think>", "Ġn", "o", "w", "!")
THINKING_REPLY = "<think> when?</think> now!"


def write_thinking_model(path, *, seed: int = 0):
    """A tiny qwen3moe GGUF that answers every chat turn with THINKING_REPLY, "<think> when?</think> now!"
    (<think> and </think> are vocabulary tokens, as in Qwen3), while its routers route every token as usual.

    Attention and expert outputs are zero, so the hidden state is the current token's embedding; the output
    matrix maps each token of the chain (starting at the prompt's last token, "\\n") to the next one with a
    wide margin. Random weights elsewhere; written as F32 in well under a second.
    """
    import math
    from pathlib import Path

    import gguf
    import numpy as np

    from moe_gguf.formats import synth

    spec = synth.PRESETS["tiny-qwen3moe"].replace(seed=seed)
    tokens, types, merges = synth.build_vocab(spec.n_vocab - 2)
    at = len(tokens) - len(synth.SPECIAL_TOKENS)
    tokens[at:at] = ["<think>", "</think>"]
    types[at:at] = [int(gguf.TokenType.USER_DEFINED)] * 2
    ids = {t: i for i, t in enumerate(tokens)}
    im_end = len(tokens) - 1
    byte_nl = synth._byte_chars()[10]
    chain = [ids[byte_nl], *(ids[t] for t in THINKING_CHAIN), im_end]
    assert len(set(chain)) == len(chain), "every token of the chain must be distinct"

    rng = np.random.default_rng(seed)
    V, E = spec.n_vocab, spec.n_embd
    embd = rng.standard_normal((V, E)).astype(np.float32)
    unit = embd / np.linalg.norm(embd, axis=1, keepdims=True)
    out = np.zeros((V, E), np.float32)
    for cur, nxt in zip(chain, chain[1:], strict=False):
        out[nxt] += 4.0 * unit[cur]  # logit of nxt given cur: 4 * sqrt(E) = 64; any other: ~N(0, 4^2)
    overrides = {"token_embd.weight": embd, "output.weight": out}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = synth._tensor_plan(spec)
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_name("synth-thinking")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    synth._add_hparams(w, spec)
    synth.add_tokenizer(w, tokens, types, merges)
    for t in plan:
        if t.name in overrides:
            data = overrides[t.name]
        elif t.name.endswith(("attn_output.weight", "ffn_down_exps.weight")):
            data = np.zeros(t.shape, np.float32)
        else:
            data = np.concatenate(list(synth._chunks(t, spec.arch, spec.seed, np.float32)))
        assert data.shape == t.shape and math.prod(data.shape) == data.size
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
