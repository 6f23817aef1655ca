"""Reasoning models: a reply that starts with ``<think>…</think>`` (Qwen3, DeepSeek-R1 style) is split into its
thinking and its answer. gpt-oss style channels are not parsed (its harmony template is not ChatML)."""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Split:
    thinking: str | None  # None: the reply has no thinking part
    answer: str
    thinking_done: bool  # the closing tag was seen (or there is no thinking)


def split_thinking(text: str) -> Split:
    """Split a (possibly partial) reply. A reply whose chat template opened the thinking in the prompt has
    only the closing tag: everything before it is thinking."""
    stripped = text.lstrip()
    close = text.find(THINK_CLOSE)
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN):]
        end = body.find(THINK_CLOSE)
        if end < 0:
            return Split(body.strip("\n"), "", False)
        return Split(body[:end].strip("\n"), body[end + len(THINK_CLOSE):].lstrip(), True)
    if close >= 0 and THINK_OPEN not in text[:close]:
        return Split(text[:close].strip("\n"), text[close + len(THINK_CLOSE):].lstrip(), True)
    if THINK_OPEN.startswith(stripped) and stripped:  # "<thi" while streaming: not shown as the answer yet
        return Split("", "", False)
    return Split(None, text, True)
