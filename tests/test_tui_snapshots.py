"""Snapshot tests (pytest-textual-snapshot) of the chat UI's main screens.

Deterministic by construction: conversations come from the store (not from sampling), routing data is fixed,
timing-dependent numbers are hidden (stable_stats), the terminal size and the time zone are fixed.
Update after an intended UI change with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import TokenTrace
from moe_gguf.formats.topology import ModelTopology
from moe_gguf.tui.app import MoEChatApp
from moe_gguf.tui.config import Config, Sampling
from moe_gguf.tui.store import ConversationStore
from moe_gguf.tui.testing import GREEDY, wait_ready
from moe_gguf.tui.widgets.heatmap import ExpertHeatmap
from moe_gguf.tui.widgets.tokens import TokenInspector

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp

SIZE = (130, 40)

REPLY = """Experts are **specialised** sub-networks; the router picks a few per token.

```python
profile.disable(12, 87).bias(5, 17, -2.0)
```

1. disable: never selected
2. force: always selected
"""


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_GGUF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MOE_GGUF_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.chdir(tmp_path)
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(scope="module")
def model_path(synth_model):
    return synth_model("qwen3moe", "q8_0")


def _store(tmp_path, compare: bool = False, profile: dict | None = None) -> tuple[ConversationStore, int]:
    """A stored conversation; its reply was steered by `profile` (a profile dict: resuming restores it)."""
    store = ConversationStore(tmp_path / "data" / "conversations.db")
    cid = store.new_conversation("What are experts?", model="synth-qwen3moe")
    store.add_message(cid, "user", "What are experts in a MoE model?")
    steering = {"enabled": True, "strength": 1.0, "profile": profile or {"name": "quiet"}}
    meta = {"n_tokens": 42, "steering": steering, "sampling": GREEDY.to_dict()}
    if compare:
        meta["compare"] = "Without steering the router keeps its **usual** experts.\n\n```sh\necho unsteered\n```\n"
    store.add_message(cid, "assistant", REPLY, meta=meta)
    old = 1_700_000_000.0
    store._x("UPDATE conversations SET created = ?, updated = ?", (old, old))
    store.new_conversation("Second chat", model="synth-qwen3moe")
    store._x("UPDATE conversations SET created = ?, updated = ? WHERE id = 2", (old + 3600, old + 3600))
    return store, cid


def _app(model_path, store, **kw) -> MoEChatApp:
    return MoEChatApp(model_path=model_path, n_ctx=512, threads=1, store=store, config=Config(),
                      sampling=Sampling(**GREEDY.to_dict()), stable_stats=True, **kw)


def _profile(tmp_path, model_path):
    topo = ModelTopology.from_gguf(model_path)
    path = tmp_path / "quiet.json"
    SteeringProfile.for_model(topo, name="quiet").disable(1, 3).force(0, 5).bias(1, 6, -2.0).save(path)
    return path


def _steered(tmp_path, model_path, compare: bool = False) -> tuple[ConversationStore, int, Path]:
    """A conversation steered by the quiet profile (resuming it restores that profile), and the profile file."""
    path = _profile(tmp_path, model_path)
    store, cid = _store(tmp_path, compare, SteeringProfile.load(path).to_dict())
    return store, cid, path


async def _settle(pilot, cid=None) -> None:
    app = pilot.app
    await wait_ready(pilot)
    if cid is not None:
        await app.chat.load_conversation(cid)
    await pilot.pause()
    app.clear_notifications()
    await _no_cursor(pilot)


async def _no_cursor(pilot) -> None:
    """No focused text input: a blinking cursor would make the screenshot depend on timing."""
    pilot.app.set_focus(None)
    await pilot.pause()


def _fixed_routing(app) -> None:
    topo = app.session.topology
    rng = np.random.default_rng(0)
    routed = np.zeros(topo.n_layer, np.int64)
    sel = np.zeros((topo.n_layer, topo.n_expert), np.int64)
    for il in topo.moe_layers:
        routed[il] = 40
        for _ in range(40):
            sel[il, rng.choice(topo.n_expert, topo.n_expert_used, replace=False)] += 1
    app.chat.query_one(ExpertHeatmap).set_data(sel, routed, marks=app.session.steered_cells(),
                                                title="routing of this reply, 40 tokens")


def test_main_screen(snap_compare, tmp_path, model_path):
    store, cid, profile = _steered(tmp_path, model_path)
    app = _app(model_path, store, profiles=[str(profile)])

    async def run_before(pilot):
        await _settle(pilot, cid)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_experts_heatmap(snap_compare, tmp_path, model_path):
    store, cid, profile = _steered(tmp_path, model_path)
    app = _app(model_path, store, profiles=[str(profile)])

    async def run_before(pilot):
        await _settle(pilot, cid)
        _fixed_routing(pilot.app)
        pilot.app.chat.show_tab("tab-experts")
        await _no_cursor(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_token_view(snap_compare, tmp_path, model_path):
    store, cid = _store(tmp_path)
    app = _app(model_path, store)

    async def run_before(pilot):
        await _settle(pilot, cid)
        chat = pilot.app.chat
        chat.show_tab("tab-tokens")
        inspector = chat.query_one(TokenInspector)
        inspector.set_tokens(["Ex", "perts", " are", " special", "ised"], steered_from=2)
        routes = [TokenTrace(il, 0, 10, 7, np.array([3, 5], np.int32), np.array([0.7, 0.3], np.float32))
                  for il in (0, 1)]
        inspector.show_routes(1, "perts", routes, {(1, 3): "disable"})
        await _no_cursor(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_compare_view(snap_compare, tmp_path, model_path):
    store, cid = _store(tmp_path, compare=True)
    app = _app(model_path, store)

    async def run_before(pilot):
        await _settle(pilot, cid)  # resuming a compare-mode chat turns compare mode on
        assert pilot.app.chat.compare_mode
        await _no_cursor(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_conversations_screen(snap_compare, tmp_path, model_path):
    store, cid = _store(tmp_path)
    app = _app(model_path, store)

    async def run_before(pilot):
        await _settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare, tmp_path, model_path):
    store, _ = _store(tmp_path)
    app = _app(model_path, store, system_prompt="You are a concise assistant.")

    async def run_before(pilot):
        await _settle(pilot)
        await pilot.press("ctrl+s")
        await _no_cursor(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# -- small terminals (the side panel is an overlay below 100 columns) and reasoning replies ------------------------

SMALL, TINY = (80, 24), (60, 15)


def test_main_screen_80x24(snap_compare, tmp_path, model_path):
    store, cid, profile = _steered(tmp_path, model_path)
    app = _app(model_path, store, profiles=[str(profile)])

    async def run_before(pilot):
        await _settle(pilot, cid)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_side_panel_overlay_80x24(snap_compare, tmp_path, model_path):
    store, cid, profile = _steered(tmp_path, model_path)
    app = _app(model_path, store, profiles=[str(profile)])

    async def run_before(pilot):
        await _settle(pilot, cid)
        await pilot.press("f3")
        await _no_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_main_screen_60x15(snap_compare, tmp_path, model_path):
    store, cid = _store(tmp_path)
    app = _app(model_path, store)

    async def run_before(pilot):
        await _settle(pilot, cid)

    assert snap_compare(app, terminal_size=TINY, run_before=run_before)


def test_conversations_screen_60x15(snap_compare, tmp_path, model_path):
    store, _ = _store(tmp_path)
    app = _app(model_path, store)

    async def run_before(pilot):
        await _settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(app, terminal_size=TINY, run_before=run_before)


def test_settings_screen_80x24(snap_compare, tmp_path, model_path):
    store, _ = _store(tmp_path)
    app = _app(model_path, store, system_prompt="You are a concise assistant.")

    async def run_before(pilot):
        await _settle(pilot)
        await pilot.press("ctrl+s")
        await _no_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_thinking_reply_folded(snap_compare, tmp_path, model_path):
    store = ConversationStore(tmp_path / "data" / "conversations.db")
    cid = store.new_conversation("Reasoning", model="synth-qwen3moe")
    store.add_message(cid, "user", "Which experts matter?\nAnswer in one line.")
    meta = {"n_tokens": 30, "steering": {"enabled": False}, "sampling": GREEDY.to_dict(), "finish": "length"}
    store.add_message(cid, "assistant", "<think>\nThe user asks about experts. Keep it short.\n</think>\n"
                      "The **routed** ones.", meta=meta)
    app = _app(model_path, store)

    async def run_before(pilot):
        await _settle(pilot, cid)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
