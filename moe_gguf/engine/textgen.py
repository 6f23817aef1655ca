"""Text in, text out: what `moe-gguf generate` does, as one call."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_gguf.engine.context import Completion, Request
from moe_gguf.formats.profile import Schedule, SteeringProfile

if TYPE_CHECKING:
    from moe_gguf.engine.model import MoEModel


def generate_text(model: MoEModel, prompt: str, *, profile: SteeringProfile | None = None, raw: bool = False,
                  max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  strength: float = 1.0, schedule: Schedule | None = None, compare: bool = False) -> list[Completion]:
    """Generate for ``prompt`` (a user message in the model's chat template unless ``raw``).

    Returns [steered] or, with ``compare``, [steered, unsteered] decoded in the same batches. ``schedule``
    overrides the profile's own.
    """
    text = prompt if raw else model.chat_prompt([{"role": "user", "content": prompt}])
    tokens = model.tokenize(text, add_bos=raw)
    reqs = [Request(tokens, profile, max_tokens, strength, schedule)]
    if compare:
        reqs.append(Request(tokens, None, max_tokens))
    with model.context(n_seq_max=len(reqs)) as ctx:
        return ctx.generate_many(reqs, temperature=temperature, top_p=top_p, seed=seed)
