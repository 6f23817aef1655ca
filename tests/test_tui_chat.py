"""Chat UI (tui/): no lost turns, each chat keeps its own steering, reasoning models, small terminals.

Pilot tests on real synthetic GGUFs through the real patched llama.cpp; the reasoning model is a tiny qwen3moe
whose weights make it answer "<think> when?</think> now!" (tui.testing.write_thinking_model).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat

import pytest
from textual.widgets import Collapsible, Input, Select, Static, Switch

from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.topology import ModelTopology
from moe_gguf.tui.app import MoEChatApp
from moe_gguf.tui.config import Sampling
from moe_gguf.tui.screens.dialogs import Confirm, FilePicker
from moe_gguf.tui.screens.settings import SettingsScreen
from moe_gguf.tui.store import SCHEMA_VERSION, ConversationStore
from moe_gguf.tui.testing import GREEDY, THINKING_REPLY, send, wait_for, wait_idle, wait_ready, write_thinking_model
from moe_gguf.tui.thinking import split_thinking
from moe_gguf.tui.widgets.chat_input import ChatInput
from moe_gguf.tui.widgets.heatmap import ExpertHeatmap
from moe_gguf.tui.widgets.message import MessageView
from moe_gguf.tui.widgets.steering import SteeringPanel
from moe_gguf.tui.widgets.tokens import TokenInspector

pytestmark = pytest.mark.native

SIZE = (120, 40)


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_GGUF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MOE_GGUF_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="module")
def model_path(synth_model):
    return synth_model("qwen3moe", "q8_0")


@pytest.fixture(scope="module")
def thinking_model(model_dir):
    path = model_dir / "thinking.gguf"
    return path if path.exists() else write_thinking_model(path)


def make_app(model_path, **kw) -> MoEChatApp:
    kw.setdefault("sampling", Sampling(**GREEDY.to_dict()))
    kw.setdefault("stable_stats", True)
    return MoEChatApp(model_path=model_path, n_ctx=kw.pop("n_ctx", 512), threads=1, **kw)


def db(dirs) -> ConversationStore:
    return ConversationStore(dirs / "data" / "conversations.db")


def messages_of(app) -> list[str]:
    return [n.message for n in app._notifications]


# -- 1. regenerate: a new random seed per reply -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_regenerate_samples_again_with_a_new_seed(model_path, dirs):
    app = make_app(model_path, sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=12))  # seed: default
    assert Sampling().seed is None
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "tell me")
        replies = [chat.turns[1].content]
        for _ in range(3):
            before = chat.turns[1]
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda b=before: chat.turns[-1] is not b and not chat.generating, what="regenerated")
            replies.append(chat.turns[1].content)
        assert len(set(replies)) > 1, replies
        saved = db(dirs).messages(chat.conversation_id)[1]
        seed = saved.meta["seed"]
        assert isinstance(seed, int)
        # the replies a regenerate replaced are kept with the reply, newest first; u brings them back
        assert [v["content"] for v in saved.meta["previous"]] == replies[-2::-1]
        chat.turns[1].view.focus()
        await pilot.press("u")
        await pilot.pause()
        assert chat.turns[1].content == replies[-2] == db(dirs).messages(chat.conversation_id)[1].content
        await pilot.press("u", "u", "u")  # round the list, back to the newest
        await pilot.pause()
        assert chat.turns[1].content == replies[-1]
        # a fixed seed is a setting: then regenerate repeats the reply
        app.sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=12, seed=seed)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not chat.generating and chat.turns[-1].status == "done", what="regenerated")
        await wait_idle(pilot)
        assert chat.turns[1].content == replies[-1]


# -- 2. edit & resend, regenerate: nothing lost without asking ------------------------------------------------


@pytest.mark.asyncio
async def test_cancelled_edit_deletes_nothing(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "one")
        await send(pilot, "two")
        cid = chat.conversation_id
        await pilot.press("ctrl+g")
        assert chat.query_one(ChatInput).text == "two"
        await pilot.press("escape")
        await pilot.pause()
        assert len(db(dirs).messages(cid)) == 4 and len(chat.turns) == 4
        assert chat.editing is None and chat.query_one(ChatInput).text == ""
        assert not any(t.view.has_class("-replaced") for t in chat.turns)
        await pilot.press("ctrl+g")
        await pilot.press("ctrl+n")  # leaving the chat mid-edit: nothing deleted either
        await pilot.pause()
        assert len(db(dirs).messages(cid)) == 4


# -- 3. another model: a profile made for the old one is dropped, or applied with allow-mismatch --------------


@pytest.mark.asyncio
async def test_open_another_model_drops_the_old_profile(model_path, synth_model, dirs):
    other = synth_model("mixtral", "f32")  # same shapes, another architecture
    profile = dirs / "quiet.json"
    SteeringProfile.for_model(ModelTopology.from_gguf(model_path), name="quiet").disable(1, 3).save(profile)
    app = make_app(model_path, profiles=[str(profile)])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        assert app.session.steering_active
        app.load_model(other)
        await wait_ready(pilot)
        assert app.session.model_name == "synth-mixtral"
        assert not app.session.steering_active and not app.session.profile.entries
        assert any("made for another model" in m for m in messages_of(app))
        status = str(chat.query_one("#status", Static).render())
        assert "steering ON" not in status
        await send(pilot, "still works")
        assert chat.turns[-1].status == "done" and chat.turns[-1].content
        # the switch in the Steer tab: apply it anyway (every entry fits this model)
        chat.query_one("#allow-mismatch", Switch).value = True
        await pilot.pause()
        assert app.session.allow_mismatch
        assert app.load_profiles([profile])
        assert app.session.steering_active
        await send(pilot, "steered")
        meta = db(dirs).messages(chat.conversation_id)[-1].meta
        assert meta["steering"]["enabled"] and meta["steering"]["profile"]["name"] == "quiet"


@pytest.mark.asyncio
async def test_profile_for_other_weights_of_the_same_shape_warns_in_the_ui(model_path, model_dir, dirs):
    from moe_gguf.formats.synth import PRESETS, write_gguf

    finetune = model_dir / "tiny-qwen3moe-seed1.gguf"
    if not finetune.exists():
        write_gguf(PRESETS["tiny-qwen3moe"].replace(seed=1), finetune, dtype="f32")
    profile = dirs / "quiet.json"
    SteeringProfile.for_model(ModelTopology.from_gguf(finetune), name="quiet").disable(1, 3).save(profile)
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.load_profiles([profile])  # same shape: applied, with a warning naming both
        await pilot.pause()
        warned = [n for n in app._notifications if "router weights" in n.message]
        assert warned and warned[0].severity == "warning"
        await send(pilot, "steered")
        assert app.chat.turns[-1].status == "done"
        assert db(dirs).messages(app.chat.conversation_id)[-1].meta["steering"]["enabled"]


def test_chat_command_takes_allow_model_mismatch(monkeypatch):
    from click.testing import CliRunner

    from moe_gguf.cli import main
    from moe_gguf.tui import app as tui_app

    seen = {}

    def run_chat(*, allow_model_mismatch: bool = False, **kw) -> None:
        seen.update(kw, allow_model_mismatch=allow_model_mismatch)

    monkeypatch.setattr(tui_app, "run_chat", run_chat)
    result = CliRunner().invoke(main, ["chat", "m.gguf", "--allow-model-mismatch", "--profile", "p.json"])
    assert result.exit_code == 0, result.output
    assert seen["allow_model_mismatch"] is True and seen["profiles"] == ["p.json"]


# -- 4. compare mode: the context is shared by two sequences ----------------------------------------------------


@pytest.mark.asyncio
async def test_compare_mode_fits_max_tokens_into_the_shared_context(model_path, dirs):
    app = make_app(model_path, sampling=Sampling(0.0, 1.0, 250, 0), n_ctx=512)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        app.session.add_entry(1, 3, "disable")
        await pilot.press("ctrl+l")
        await send(pilot, "compare with long replies")
        assert not any("exceed the context" in m for m in messages_of(app))
        reply = db(dirs).messages(chat.conversation_id)[-1]
        assert reply.status == "done" and "compare" in reply.meta
        assert reply.meta["n_prompt"] + reply.meta["n_tokens"] <= 256


# -- 5. copy: a clipboard tool, and plain words when nothing could be copied ----------------------------------


@pytest.mark.asyncio
async def test_copy_uses_a_clipboard_tool_and_says_when_it_could_not(model_path, dirs, monkeypatch):
    bin_dir = dirs / "bin"
    bin_dir.mkdir()
    sink = dirs / "clipboard.txt"
    tool = bin_dir / "xclip"
    tool.write_text(f"#!/bin/sh\nexec {shutil.which('cat')} > {sink}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    store = db(dirs)
    cid = store.new_conversation("copy", model="m")
    store.add_message(cid, "user", "q")
    store.add_message(cid, "assistant", "<think>hmm</think>the answer")
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await app.chat.load_conversation(cid)
        monkeypatch.delenv("TMUX", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        monkeypatch.setenv("DISPLAY", ":99")
        monkeypatch.setenv("PATH", str(bin_dir))
        app.clear_notifications()
        await pilot.press("f5")
        await pilot.pause()
        assert sink.read_text() == "the answer"  # the answer, without the thinking
        assert any("with xclip" in m for m in messages_of(app))
        monkeypatch.setenv("PATH", str(dirs / "empty"))  # no tool at all (tmux's default: OSC 52 ignored)
        app.clear_notifications()
        await pilot.press("f5")
        await pilot.pause()
        (note,) = app._notifications
        assert "Could not confirm" in note.message and note.severity == "warning"


# -- 6. a chat owns its steering and sampling; resuming restores them -------------------------------------------


@pytest.mark.asyncio
async def test_resume_restores_the_chats_steering_compare_and_sampling(model_path, dirs):
    profile = dirs / "quiet.json"
    SteeringProfile.for_model(ModelTopology.from_gguf(model_path), name="quiet").bias(1, 3, -2.0).save(profile)
    app = make_app(model_path, profiles=[str(profile)])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        app.session.set_strength(1.5)
        chat.refresh_steering()
        await pilot.press("ctrl+l")
        app.sampling = Sampling(0.0, 1.0, 9, 3)
        await send(pilot, "steered chat")
        first = chat.conversation_id
        # another chat, other settings
        await pilot.press("ctrl+n")
        await pilot.press("ctrl+l")
        await pilot.press("ctrl+t")
        app.session.new_profile()
        app.sampling = Sampling(0.0, 1.0, 7, None)
        await send(pilot, "plain chat")
        second = chat.conversation_id
        assert not chat.compare_mode
    app = make_app(model_path)  # a new session: nothing loaded, compare off
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await chat.load_conversation(first)
        await pilot.pause()
        s = app.session
        assert chat.compare_mode and s.steering_active and s.strength == 1.5 and s.profile.name == "quiet"
        assert [(e.layer, e.expert, e.action) for e in s.profile.entries] == [(1, 3, "bias")]
        assert app.sampling == Sampling(0.0, 1.0, 9, 3)
        assert any("Resumed with its settings" in m for m in messages_of(app))
        exported = json.loads(db(dirs).export_json(first))
        assert exported["settings"]["compare"] is True and exported["settings"]["steering"]["strength"] == 1.5
        await chat.load_conversation(second)
        await pilot.pause()
        assert not chat.compare_mode and not s.steering_active and app.sampling.max_tokens == 7
        # the profile file is gone: the chat's own copy is used, and the user is told
        profile.unlink()
        app.clear_notifications()
        await chat.load_conversation(first)
        await pilot.pause()
        assert s.steering_active and s.profile.name == "quiet"
        assert any("no longer exists" in m for m in messages_of(app))


@pytest.mark.asyncio
async def test_resume_loads_the_chats_model_again(model_path, synth_model, dirs):
    other = synth_model("mixtral", "f32")
    profile = dirs / "quiet.json"
    SteeringProfile.for_model(ModelTopology.from_gguf(model_path), name="quiet").disable(1, 3).save(profile)
    app = make_app(model_path, profiles=[str(profile)])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "on qwen")
        first = chat.conversation_id
        await pilot.press("ctrl+n")
        app.load_model(other)
        await wait_ready(pilot)
        assert app.session.model_name == "synth-mixtral" and not app.session.steering_active
        await chat.load_conversation(first)
        await wait_ready(pilot)
        await pilot.pause()
        assert app.session.model_path == model_path and app.session.model_name == "synth-qwen3moe"
        assert app.session.steering_active and app.session.profile.name == "quiet"
        await send(pilot, "still on qwen")
        assert db(dirs).messages(first)[-1].meta["steering"]["enabled"]


@pytest.mark.asyncio
async def test_damaged_saved_settings_and_routing_are_reported_not_fatal(model_path, dirs):
    store = db(dirs)
    cid = store.new_conversation("damaged", model="m")
    store.add_message(cid, "user", "q")
    mid = store.add_message(cid, "assistant", "a", meta={"n_tokens": 1})
    store._x("UPDATE conversations SET settings = ? WHERE id = ?",
             ('{"steering": "nonsense", "sampling": {"temperature": "hot"}, "model_path": 3}', cid))
    store._x("UPDATE messages SET routing = ? WHERE id = ?", ('{"moe_layers": [0, 1], "n_expert": 8, "seqs": [7]}', mid))
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await chat.load_conversation(cid)
        await pilot.pause()
        assert app.is_running and [t.content for t in chat.turns] == ["q", "a"]
        text = " ".join(messages_of(app))
        assert "could not be restored" in text and "steering could not be read" in text
        assert "could not be read" in chat.query_one(ExpertHeatmap).title
        await send(pilot, "and on")  # the conversation goes on
        assert len(chat.turns) == 4


def test_store_migrates_a_version_1_database(dirs):
    path = dirs / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, created REAL NOT NULL,
            updated REAL NOT NULL, model TEXT NOT NULL DEFAULT '', system_prompt TEXT NOT NULL DEFAULT '');
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id INTEGER NOT NULL
            REFERENCES conversations(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL,
            created REAL NOT NULL, status TEXT NOT NULL DEFAULT 'done', meta TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO conversations VALUES (1, 'old chat', 1, 1, 'm', 'sys');
        INSERT INTO messages VALUES (1, 1, 'user', 'hi', 1, 'done', '{}');
        INSERT INTO messages VALUES (2, 1, 'assistant', 'hello', 2, 'done',
            '{"steering": {"enabled": true, "strength": 1.5, "profile": {"name": "p"}}}');
    """)
    old.commit()
    old.close()
    store = ConversationStore(path)
    assert store._x("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (conv,) = store.conversations()
    assert (conv.title, conv.system_prompt) == ("old chat", "sys") and store.settings(1) == {}
    user, reply = store.messages(1)
    assert (user.content, reply.content, reply.routing) == ("hi", "hello", None)
    store.update_message(2, "hello", routing={"version": 1, "seqs": []})
    store.set_settings(1, {"compare": True})
    store.close()
    again = ConversationStore(path)  # reopening a migrated database changes nothing
    assert again.messages(1)[1].routing == {"version": 1, "seqs": []} and again.settings(1) == {"compare": True}


# -- 8. the smaller ones ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failed_send_leaves_no_stray_message(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        real = app.session.generate

        def broken(*a, **kw):
            raise RuntimeError("context full")
            yield from real(*a, **kw)

        app.session.generate = broken
        chat = app.chat
        chat.query_one(ChatInput).load_text("lost?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not chat.generating and not chat.turns, what="the failure")
        assert chat.query_one(ChatInput).text == "lost?"  # back in the input, to send again
        app.session.generate = real
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and not chat.generating, what="the reply")
        assert [m.role for m in db(dirs).messages(chat.conversation_id)] == ["user", "assistant"]


@pytest.mark.asyncio
async def test_multiline_message_and_cut_reply_are_shown_as_they_are(model_path, dirs):
    app = make_app(model_path, sampling=Sampling(0.0, 1.0, 3, 0))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "line one\nline two")
        body = chat.turns[0].view.query_one(".message-body", Static)
        assert "line one\nline two" in str(body.render())
        header = str(chat.turns[1].view.query_one(".message-header", Static).render())
        assert "cut at max tokens" in header
        assert db(dirs).messages(chat.conversation_id)[1].meta["finish"] == "length"
        md = db(dirs).export_markdown(chat.conversation_id)
        assert "[cut at max tokens]" in md


@pytest.mark.asyncio
async def test_save_profile_never_overwrites_without_asking(model_path, dirs, monkeypatch):
    monkeypatch.chdir(dirs)
    path = dirs / "quiet.json"
    SteeringProfile.for_model(ModelTopology.from_gguf(model_path), name="quiet").disable(1, 3).save(path)
    before = path.read_text()
    app = make_app(model_path, profiles=[str(path)])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        app.session.add_entry(0, 5, "force")
        app.chat.save_profile_dialog()
        await pilot.pause()
        picker = app.screen
        assert isinstance(picker, FilePicker)
        assert picker.query_one("#file-path", Input).value.endswith("quiet-2.json")  # a new name by default
        picker.query_one("#file-path", Input).value = str(path)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")
        await pilot.pause()
        assert path.read_text() == before
        app.chat.save_profile_dialog()
        await pilot.pause()
        app.screen.query_one("#file-path", Input).value = str(path)
        await pilot.press("enter")
        await pilot.press("y")
        await pilot.pause()
        assert len(SteeringProfile.load(path).entries) == 2


@pytest.mark.asyncio
async def test_focus_keys_and_heatmap_keyboard(model_path):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "hi")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.focused, ChatInput)  # back to the input after a dialog
        side = chat.query_one("#side")
        await pilot.press("f2")  # the panel is open on Steer: next, Experts
        await pilot.pause()
        assert side.active == "tab-experts" and isinstance(app.focused, ExpertHeatmap)
        await pilot.press("down", "right", "right", "enter")
        await pilot.pause()
        topo = app.session.topology
        panel = chat.query_one(SteeringPanel)
        assert side.active == "tab-steer"
        assert panel.query_one("#add-layer", Input).value == str(topo.moe_layers[1])
        assert panel.query_one("#add-expert", Input).value == "2"
        await pilot.press("f2", "f2")
        await pilot.pause()
        assert side.active == "tab-tokens"
        await pilot.press("f2")
        await pilot.pause()
        assert side.active == "tab-steer"
        # a focused message is marked in its own header style and background
        chat.turns[1].view.focus()
        await pilot.pause()
        assert chat.turns[1].view.styles.background != chat.turns[0].view.styles.background
        messages = chat.query_one("#messages")
        before = messages.styles.border_left
        messages.focus()  # the conversation's own Tab stop (to scroll it with the keys) shows too
        await pilot.pause()
        assert messages.styles.border_left != before


@pytest.mark.asyncio
async def test_token_routes_are_complete_once_the_reply_is_done(model_path):
    import threading

    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        chat.show_tab("tab-tokens")
        inspector = chat.query_one(TokenInspector)
        title = inspector.query_one("#token-title", Static)
        gate = threading.Event()
        real = app.session.generate

        def held(*a, **kw):  # hold after the first token, as a slow model would: its routing is not recorded yet
            for i, u in enumerate(real(*a, **kw)):
                yield u
                if i == 0:
                    gate.wait(10)

        app.session.generate = held
        chat.query_one(ChatInput).load_text("routes")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "token 0" in str(title.render()), what="token 0 shown as it arrived")
        assert inspector.routes_table.row_count < len(app.session.topology.moe_layers)
        gate.set()
        await wait_idle(pilot)
        assert "token 0" in str(title.render()) and "not decoded" not in str(title.render())
        assert inspector.routes_table.row_count == len(app.session.topology.moe_layers)


# -- 9. reasoning models ----------------------------------------------------------------------------------------


def test_config_seed_random_or_fixed(dirs):
    from moe_gguf.tui.config import load_config

    (dirs / "config").mkdir()
    (dirs / "config" / "tui.toml").write_text('[sampling]\nseed = "random"\n')
    assert load_config().sampling.seed is None and not load_config().errors
    (dirs / "config" / "tui.toml").write_text("[sampling]\nseed = 42\n")
    assert load_config().sampling.seed == 42
    (dirs / "config" / "tui.toml").write_text('[sampling]\nseed = "sometimes"\n')
    assert load_config().sampling.seed is None and "seed" in load_config().errors[0]


@pytest.mark.asyncio
async def test_quitting_mid_reply_marks_it(model_path, dirs):
    import threading

    app = make_app(model_path, sampling=Sampling(0.0, 1.0, 200, 0))
    gate = threading.Event()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        real = app.session.generate

        def slow(*a, **kw):
            for i, u in enumerate(real(*a, **kw)):
                if i == 5:
                    gate.wait(10)
                yield u

        app.session.generate = slow
        chat = app.chat
        chat.query_one(ChatInput).load_text("long")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and chat.turns[1].content, what="streaming text")
        cid = chat.conversation_id
    gate.set()
    reply = db(dirs).messages(cid)[1]
    assert reply.status == "stopped" and reply.meta["finish"] == "quit" and reply.content
    from moe_gguf.tui.screens.chat import _stored_info

    assert "the app was closed" in _stored_info(reply)


def test_split_thinking():
    assert split_thinking("<think>a b</think>\nanswer") == split_thinking("<think>\na b\n</think>answer")
    s = split_thinking("<think>a b</think>\nanswer")
    assert (s.thinking, s.answer, s.thinking_done) == ("a b", "answer", True)
    assert split_thinking("<think>still").thinking_done is False and split_thinking("<think>still").answer == ""
    assert split_thinking("opened by the template</think>ok").thinking == "opened by the template"
    assert split_thinking("plain").thinking is None and split_thinking("<thi").answer == ""


@pytest.mark.asyncio
async def test_thinking_folds_can_be_steered_after_it_and_routing_is_saved(thinking_model, dirs):
    app = make_app(thinking_model, sampling=Sampling(0.0, 1.0, 40, 0))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "hi")
        reply = chat.turns[1]
        assert reply.content == THINKING_REPLY
        view = reply.view
        assert isinstance(view, MessageView)
        fold = view.query_one(".thinking", Collapsible)
        assert fold.display and fold.collapsed and "Thought" in fold.title
        assert "when?" in str(view.query_one(".thinking-text", Static).render())
        assert view.markdown.source.strip() == "now!"
        view.focus()
        await pilot.press("t")
        assert not fold.collapsed
        # steer after the thinking: a choice of its own in the Steer tab
        forced = 5
        app.session.add_entry(1, forced, "force")
        panel = chat.query_one(SteeringPanel)
        panel.query_one("#sched-when", Select).value = "think"
        await pilot.pause()
        assert app.session.profile.schedule.after_text == "</think>"
        assert "after thinking" in str(chat.query_one("#status", Static).render())
        await send(pilot, "again")
        store = db(dirs)
        saved = store.messages(chat.conversation_id)[-1]
        think_end = saved.meta["think_end"]
        assert think_end == 6 and saved.meta["steered_from"] == think_end
        routing = saved.routing
        assert routing is not None
        entry = routing["seqs"][0]
        assert entry["think_end"] == think_end and len(entry["routes"]) == len(entry["tokens"])
        layer_row = routing["moe_layers"].index(1)
        # the answer tokens (decoded after </think>) all chose the forced expert; per-token routes agree
        assert entry["answer"]["sel"][layer_row][forced] == entry["answer"]["routed"][layer_row] > 0
        for i in range(think_end + 1, len(entry["tokens"])):
            assert any(r[0] == 1 and forced in r[1] for r in entry["routes"][i])
        heatmap = chat.query_one(ExpertHeatmap)
        assert set(heatmap.parts) == {"all", "thinking", "answer"}
        heatmap.focus()
        await pilot.press("v")
        assert heatmap.view == "thinking"
    app = make_app(thinking_model)  # resumed: the heatmap and the tokens come from the store
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await chat.load_conversation(db(dirs).conversations()[0].id)
        await pilot.pause()
        heatmap = chat.query_one(ExpertHeatmap)
        assert heatmap.routed is not None and "saved" in heatmap.title and "thinking" in heatmap.parts
        inspector = chat.query_one(TokenInspector)
        assert inspector.token_list.row_count == len(entry["tokens"])
        parts = [str(inspector.token_list.get_row_at(i)[3]) for i in range(inspector.token_list.row_count)]
        assert parts[:think_end] == ["think"] * think_end and set(parts[think_end:]) == {"answer"}
        chat.on_token_inspector_selected(TokenInspector.Selected(think_end + 1))
        await pilot.pause()
        assert inspector.routes_table.row_count == len(routing["moe_layers"])


def test_thinking_model_is_deterministic_at_any_temperature(thinking_model):
    from moe_gguf.tui.session import ChatSession

    s = ChatSession(thinking_model, n_ctx=256, threads=1)
    s.load()
    try:
        for temperature in (0.0, 1.0):
            *_, last = s.generate([{"role": "user", "content": "hey"}], sampling=Sampling(temperature, 1.0, 30, None))
            assert last.texts[0] == THINKING_REPLY and last.think_end == [6]
    finally:
        s.close()


# -- 7. small terminals ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(80, 24), (60, 15)])
async def test_small_terminals_keep_the_chat_wide_and_lists_usable(model_path, dirs, size):
    store = db(dirs)
    for i in range(3):
        store.new_conversation(f"chat {i}", model="m")
    app = make_app(model_path)
    async with app.run_test(size=size) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        side = chat.query_one("#side")
        assert not side.display  # narrow: the panel waits until asked for
        assert chat.query_one("#chat-column").size.width == size[0]
        await pilot.press("f3")
        await pilot.pause()
        assert side.display and side.has_class("-overlay")
        assert side.size.width <= size[0]
        for sel in ("#add-layer", "#add-expert", "#strength", "#sched-tokens"):
            assert chat.query_one(sel).size.width >= 5, sel
        await pilot.press("escape")  # Esc closes the overlay
        await pilot.pause()
        assert not side.display
        await pilot.press("ctrl+o")
        await pilot.pause()
        table = app.screen.query_one("#conversations")
        assert table.size.height >= 3  # header and at least two rows
        buttons = app.screen.query_one(".dialog-buttons")
        for b in buttons.children:
            assert b.region.right <= app.screen.region.right and b.region.bottom <= app.screen.region.bottom
        await pilot.press("escape")
        await pilot.press("ctrl+s")
        await pilot.pause()
        for sel in ("#temperature", "#top-p", "#max-tokens", "#seed"):
            assert app.screen.query_one(sel).size.width >= 6, sel


@pytest.mark.asyncio
async def test_conversations_dialog_buttons_fit_a_wide_terminal(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_ready(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        dialog = app.screen.query_one("#conversations-dialog")
        for b in app.screen.query_one(".dialog-buttons").children:
            assert b.region.right <= dialog.content_region.right, b.id
