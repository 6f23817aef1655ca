"""Perplexity of a text under a (possibly steered) context, and the experts-per-token sweep."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moe_gguf.engine.context import SteerContext


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token
    n_scored: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else math.inf


def perplexity(ctx: SteerContext, tokens: Sequence[int], *, chunk: int | None = None, seq_id: int = 0) -> Perplexity:
    """Chunks of ``chunk`` tokens (default: the context size), each decoded from position 0;
    every token after the first of a chunk is scored."""
    chunk = min(chunk or ctx.n_ctx, ctx.n_ctx)
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least 2 tokens of text")
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    for start in range(0, len(tokens) - 1, chunk):
        part = list(tokens[start:start + chunk])
        if len(part) < 2:
            break
        ctx.clear_memory(seq_id)
        logits = ctx.decode([(seq_id, part, 0)], logits="all")[seq_id].astype(np.float64)
        z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(part) - 1), part[1:]].sum()
        n += len(part) - 1
    secs = time.perf_counter() - t0
    return Perplexity(math.exp(nll / n), nll / n, n, secs)


def perplexity_of_documents(ctx: SteerContext, docs: Sequence[Sequence[int]]) -> Perplexity:
    """Perplexity over several documents, each decoded from position 0 (no document sees another)."""
    parts = [perplexity(ctx, d) for d in docs if len(d) >= 2]
    if not parts:
        raise ValueError("perplexity needs at least one document of 2 or more tokens")
    n = sum(p.n_scored for p in parts)
    nll = sum(p.nll * p.n_scored for p in parts) / n
    return Perplexity(math.exp(nll), nll, n, sum(p.seconds for p in parts))


@dataclass
class SweepRow:
    n_expert_used: int
    perplexity: float
    pp_tokens_per_s: float  # prompt processing (the perplexity pass)
    tg_tokens_per_s: float  # generation, one token per decode


def sweep(ctx: SteerContext, ks: Sequence[int], tokens: Sequence[int], *, gen_tokens: int = 32) -> list[SweepRow]:
    """For each k: perplexity of ``tokens`` and decode speed with k experts per token.

    Decode speed is ``gen_tokens`` single-token decodes after an 8-token prompt, greedy, whatever the tokens are
    (an end-of-generation token does not stop it, so every k times the same amount of work). Before anything is
    timed, a short decode with every expert in use pages all expert weights in (the file is mmapped: the first k
    used to be charged for it, k=1 500 tok/s then k=2 2,112), and each k is decoded once untimed after the switch
    (its graph is rebuilt).
    """
    rows = []
    prompt = list(tokens[:8])
    try:
        ctx.set_n_expert_used(ctx.model.topology.n_expert)
        _decode_speed(ctx, prompt, 2)
        for k in ks:
            ctx.set_n_expert_used(k)
            _decode_speed(ctx, prompt, 2)
            ppl = perplexity(ctx, tokens)
            ctx.clear_memory()
            rows.append(SweepRow(k, ppl.perplexity, ppl.tokens_per_second, _decode_speed(ctx, prompt, gen_tokens)))
    finally:
        ctx.set_n_expert_used(0)
    return rows


def _decode_speed(ctx: SteerContext, prompt: list[int], n: int) -> float:
    """Tokens per second of ``n`` greedy single-token decodes after ``prompt`` (sequence 0, cleared after)."""
    ctx.clear_memory(0)
    logits = ctx.decode([(0, prompt, 0)])[0]
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(logits))
        logits = ctx.decode([(0, [tok], pos)])[0]
        pos += 1
    dt = time.perf_counter() - t0
    ctx.clear_memory(0)
    return n / dt


def rows_to_json(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
