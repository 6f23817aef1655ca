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
