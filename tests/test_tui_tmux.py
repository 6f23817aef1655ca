"""The real `moe-gguf chat` in a real terminal (tmux): start, chat, newline key, toggle steering, quit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest
from moe_gguf.tui.store import ConversationStore

pytestmark = [pytest.mark.native, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def _wait(session: str, predicate, what: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; the screen was:\n{screen}")


def test_chat_in_a_real_terminal(synth_model, tmp_path):
    model = synth_model("qwen3moe", "q8_0")
    data = tmp_path / "data"
    session = f"moe-gguf-test-{uuid.uuid4().hex[:8]}"
    env = {"MOE_GGUF_DATA_DIR": str(data), "MOE_GGUF_CONFIG_DIR": str(tmp_path / "config"), "TERM": "xterm-256color"}
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "moe_gguf", "chat", str(model),
                        "-c", "512", "-t", "1", "--system", "'Be brief.'"])
    # COLUMNS / LINES (set by pytest or CI) would override the terminal's real size
    _tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", f"env -u COLUMNS -u LINES {command}; sleep 30")
    try:
        _wait(session, lambda s: "synth-qwen3moe" in s and "steering on" in s, "the app to start and load the model")
        _tmux("send-keys", "-t", session, "-l", "hello")
        _tmux("send-keys", "-t", session, "C-j")  # the newline key of a real terminal
        _tmux("send-keys", "-t", session, "-l", "world")
        _tmux("send-keys", "-t", session, "Enter")
        screen = _wait(session, lambda s: "Assistant" in s and " tok ·" in s, "the reply")
        assert "hello" in screen and "world" in screen and "ctx" in screen
        _tmux("send-keys", "-t", session, "C-t")
        _wait(session, lambda s: "steering off" in s, "steering to be toggled off")
        _tmux("send-keys", "-t", session, "C-q")
        _wait(session, lambda s: "Assistant" not in s, "the app to quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    store = ConversationStore(data / "conversations.db")
    (conv,) = store.conversations()
    user, reply = store.messages(conv.id)
    assert user.content == "hello\nworld" and conv.system_prompt == "Be brief."
    assert reply.role == "assistant" and reply.status == "done" and reply.content
