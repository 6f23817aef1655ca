"""The real `moe-gguf chat` in a real terminal (tmux): start, chat, newline key, toggle steering, quit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

from moe_gguf.tui.store import ConversationStore
from moe_gguf.tui.testing import THINKING_REPLY
from moe_gguf.tui.thinking import split_thinking

CLI = [sys.executable, "-m", "moe_gguf"]

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
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), *CLI, "chat", str(model),
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


def test_small_terminal_80x24(synth_model, tmp_path):
    """At 80×24 the chat gets the whole width; the side panel opens over it with F3 and closes again."""
    model = synth_model("qwen3moe", "q8_0")
    data = tmp_path / "data"
    session = f"moe-gguf-test-{uuid.uuid4().hex[:8]}"
    env = {"MOE_GGUF_DATA_DIR": str(data), "MOE_GGUF_CONFIG_DIR": str(tmp_path / "config"), "TERM": "xterm-256color"}
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), *CLI, "chat", str(model),
                        "-c", "512", "-t", "1"])
    _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", f"env -u COLUMNS -u LINES {command}; sleep 30")
    try:
        screen = _wait(session, lambda s: "synth-qwen3moe ·" in s, "the app to start and load the model")
        assert "Steer  Experts" not in screen  # the panel waits until asked for
        _tmux("send-keys", "-t", session, "-l", "a message that is long enough to need most of the eighty columns")
        _tmux("send-keys", "-t", session, "Enter")
        screen = _wait(session, lambda s: "Assistant" in s and " tok ·" in s, "the reply")
        line = next(row for row in screen.splitlines() if "a message that is long" in row and "▌" in row)
        assert "most of the eighty columns" in line  # on one line: the chat is not squeezed by the panel
        _tmux("send-keys", "-t", session, "F3")
        _wait(session, lambda s: "Steer  Experts  Tokens" in s and "allow other model" in s, "the side panel")
        _tmux("send-keys", "-t", session, "F3")
        _wait(session, lambda s: "Steer  Experts  Tokens" not in s, "the side panel to close")
        _tmux("send-keys", "-t", session, "C-q")
        _wait(session, lambda s: "Assistant" not in s, "the app to quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_copy_inside_tmux_reaches_its_paste_buffer(model_dir, tmp_path):
    """tmux ignores OSC 52 by default: the reply goes to tmux's paste buffer, and the app says so."""
    from moe_gguf.tui.testing import write_thinking_model

    model = model_dir / "thinking.gguf"  # a model with a fixed, printable reply (random weights emit any byte)
    if not model.exists():
        write_thinking_model(model)
    session = f"moe-gguf-test-{uuid.uuid4().hex[:8]}"
    env = {"MOE_GGUF_DATA_DIR": str(tmp_path / "data"), "MOE_GGUF_CONFIG_DIR": str(tmp_path / "config"),
           "TERM": "xterm-256color"}
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), *CLI, "chat", str(model), "-c", "512", "-t", "1"])
    _tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40",
          f"env -u COLUMNS -u LINES -u DISPLAY -u WAYLAND_DISPLAY {command}; sleep 30")
    try:
        _wait(session, lambda s: "synth-thinking ·" in s, "the app to start and load the model")
        _tmux("send-keys", "-t", session, "-l", "copy me")
        _tmux("send-keys", "-t", session, "Enter")
        _wait(session, lambda s: "Assistant" in s and " tok ·" in s, "the reply")
        _tmux("set-buffer", "-b", "before", "nothing copied yet")
        _tmux("send-keys", "-t", session, "F5")
        _wait(session, lambda s: "paste buffer" in s, "the copy notice")
        copied = _tmux("show-buffer")
        assert copied and copied != "nothing copied yet"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    data = ConversationStore(tmp_path / "data" / "conversations.db")
    (conv,) = data.conversations()
    reply = data.messages(conv.id)[1].content
    assert reply == THINKING_REPLY and copied == split_thinking(reply).answer == "now!"  # the answer only
