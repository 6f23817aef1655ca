"""Pilot tests of the chat UI (tui/) on the real tiny synthetic model and the real patched llama.cpp."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from textual.widgets import DataTable, Input, Markdown, Select, Static, Switch

from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.synth import PRESETS
from moe_gguf.formats.topology import ModelTopology
from moe_gguf.tui.app import MoEChatApp, run_chat
from moe_gguf.tui.config import Sampling, load_config
from moe_gguf.tui.screens.conversations import ConversationsScreen
from moe_gguf.tui.screens.dialogs import Confirm, FilePicker
from moe_gguf.tui.screens.settings import SettingsScreen
from moe_gguf.tui.session import ChatSession
from moe_gguf.tui.store import ConversationStore
from moe_gguf.tui.testing import GREEDY, send, wait_for, wait_idle, wait_ready
from moe_gguf.tui.widgets.chat_input import ChatInput
from moe_gguf.tui.widgets.heatmap import ExpertHeatmap
from moe_gguf.tui.widgets.message import CompareView, code_blocks, visible
from moe_gguf.tui.widgets.steering import SteeringPanel
from moe_gguf.tui.widgets.tokens import TokenInspector

from .conftest import write_dense_gguf

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp

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


def make_app(model_path, **kw) -> MoEChatApp:
    kw.setdefault("sampling", Sampling(**GREEDY.to_dict()))
    kw.setdefault("stable_stats", True)
    return MoEChatApp(model_path=model_path, n_ctx=kw.pop("n_ctx", 512), threads=1, **kw)


async def press(pilot, selector: str) -> None:
    """Press a button (a click could land on a notification toast over the side panel)."""
    pilot.app.screen.query_one(selector).press()
    await pilot.pause()


def db(dirs) -> ConversationStore:
    return ConversationStore(dirs / "data" / "conversations.db")


def other_model_profile(path):
    """A valid profile made for tiny-deepseek2 (another arch and shape)."""
    spec = PRESETS["tiny-deepseek2"]
    fp = {"arch": "deepseek2", "n_layer": spec.n_layer, "n_expert": spec.n_expert, "n_expert_used": spec.n_expert_used,
          "moe_layers": [1, 2]}
    SteeringProfile(model=fp, name="other").disable(1, 3).save(path)
    return path


# -- chat: streaming, markdown, stop, regenerate, edit, copy, history --------------------------------------------


@pytest.mark.asyncio
async def test_reply_streams_as_markdown_and_is_saved(model_path, dirs, monkeypatch):
    streams = []
    real = Markdown.get_stream
    monkeypatch.setattr(Markdown, "get_stream", classmethod(lambda cls, md: streams.append(md) or real(md)))
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.session.ready and app.chat.sub_title == app.session.model_name
        await send(pilot, "hello")
        chat = app.chat
        user, reply = chat.turns
        assert (user.role, user.content, reply.role) == ("user", "hello", "assistant")
        assert reply.content and reply.view.content == reply.content
        assert streams, "the reply was streamed with Markdown.get_stream"
        assert reply.view.streaming is False  # final full render done
        status = str(chat.query_one("#status", Static).render())
        assert "ctx" in status and "/512" in status and "tok/s" in status
    msgs = db(dirs).messages(db(dirs).conversations()[0].id)
    assert [(m.role, m.status) for m in msgs] == [("user", "done"), ("assistant", "done")]
    assert msgs[1].content == reply.content
    meta = msgs[1].meta
    assert meta["sampling"] == GREEDY.to_dict() and meta["steering"]["enabled"] is False
    assert meta["n_tokens"] >= 1 and meta["n_prompt"] > 0


@pytest.mark.asyncio
async def test_generation_runs_in_a_worker_thread(model_path):
    app = make_app(model_path)
    threads = []
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        real = app.session.generate

        def spy(*a, **kw):
            threads.append(threading.current_thread())
            yield from real(*a, **kw)

        app.session.generate = spy
        await send(pilot, "hi")
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.asyncio
async def test_escape_stops_and_the_partial_reply_is_kept(model_path, dirs):
    app = make_app(model_path, sampling=Sampling(0.0, 1.0, 400, 0), n_ctx=1024)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        gate = threading.Event()
        real = app.session.generate

        def slow(*a, **kw):  # pause after a few tokens, so the test can look at the store mid-stream
            for i, u in enumerate(real(*a, **kw)):
                if i == 5:
                    gate.wait(10)
                yield u

        app.session.generate = slow
        chat = app.chat
        chat.query_one(ChatInput).load_text("tell me a long story")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and len(chat.turns[1].content) > 0, what="streaming text")
        store = db(dirs)
        cid = store.conversations()[0].id
        await wait_for(pilot, lambda: store.messages(cid)[1].content != "", what="the reply saved while streaming")
        assert store.messages(cid)[1].status == "streaming"
        await pilot.press("escape")
        gate.set()
        await wait_idle(pilot)
        reply = chat.turns[1]
        assert reply.status == "stopped"
        saved = store.messages(cid)[1]
        assert saved.status == "stopped" and saved.content == reply.content
        assert 0 < saved.meta["n_tokens"] < 400 and saved.meta["finish"] == "stopped"


@pytest.mark.asyncio
async def test_regenerate_and_edit_and_resend(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "first question")
        first_reply = chat.turns[1]
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: chat.turns[-1] is not first_reply and not chat.generating, what="regenerated")
        assert len(chat.turns) == 2 and chat.turns[1].mid != first_reply.mid
        assert chat.turns[1].content == first_reply.content  # greedy: the same reply again
        await pilot.press("ctrl+g")
        chat_input = chat.query_one(ChatInput)
        # nothing is deleted before the edit is sent: the messages it replaces are only dimmed
        assert len(chat.turns) == 2 and chat_input.text == "first question"
        assert chat.turns[0].view.has_class("-replaced") and chat.turns[1].view.has_class("-replaced")
        await pilot.press(*" again", "enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and not chat.generating, what="resent")
        assert chat.turns[0].content == "first question again"
        assert not chat.turns[0].view.has_class("-replaced")
        store = db(dirs)
        msgs = store.messages(store.conversations()[0].id)
        assert [m.content for m in msgs if m.role == "user"] == ["first question again"]
        assert len(msgs) == 2


@pytest.mark.asyncio
async def test_regenerate_and_edit_from_a_focused_message(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "one")
        await send(pilot, "two")
        first_user = chat.turns[0]
        first_user.view.focus()
        await pilot.press("e")  # edit an earlier message: it and everything after are replaced when it is sent
        assert len(chat.turns) == 4 and chat.query_one(ChatInput).text == "one"
        chat.query_one(ChatInput).load_text("uno")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and not chat.generating, what="resent")
        assert chat.turns[0].content == "uno"
        await send(pilot, "dos")
        chat.turns[1].view.focus()
        await pilot.press("r")  # an older reply: regenerating it deletes the later turns, so it asks first
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")
        await pilot.pause()
        assert len(chat.turns) == 4 and len(db(dirs).messages(chat.conversation_id)) == 4
        chat.turns[1].view.focus()
        await pilot.press("r")
        await pilot.press("y")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and not chat.generating, what="regenerated")
        assert chat.turns[0].content == "uno" and len(db(dirs).messages(chat.conversation_id)) == 2


@pytest.mark.asyncio
async def test_copy_message_and_code_blocks(model_path, dirs):
    store = db(dirs)
    cid = store.new_conversation("code", model="m")
    store.add_message(cid, "user", "show me code")
    reply = "Here:\n\n```python\nprint('a')\n```\n\nand\n\n```sh\necho b\n```\n"
    store.add_message(cid, "assistant", reply)
    app = make_app(model_path, store=store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await app.chat.load_conversation(cid)
        await pilot.press("f5")
        assert app.clipboard == reply
        await pilot.press("ctrl+b")
        assert app.clipboard == "print('a')\n"
        await pilot.press("ctrl+b")
        assert app.clipboard == "echo b\n"
        user_view = app.chat.turns[0].view
        user_view.focus()
        await pilot.press("c")
        assert app.clipboard == "show me code"
        # mouse: the [copy] link in the reply's header
        reply_view = app.chat.turns[1].view
        reply_view.focus()
        await pilot.press("b")
        assert app.clipboard == "print('a')\n"
    assert code_blocks(reply) == ["print('a')\n", "echo b\n"]


@pytest.mark.asyncio
async def test_enter_sends_newline_keys_insert_and_history(model_path):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        chat_input = chat.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert chat_input.text == "a\nb\nc" and chat.turns == []
        chat_input.clear()
        await send(pilot, "first")
        await send(pilot, "second")
        chat_input.focus()
        await pilot.press("d", "r", "a", "f", "t")
        await pilot.press("up")
        assert chat_input.text == "second"
        await pilot.press("up")
        assert chat_input.text == "first"
        await pilot.press("down")
        assert chat_input.text == "second"
        await pilot.press("down")
        assert chat_input.text == "draft"


# -- settings, system prompt, chat template ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_settings_dialog_changes_sampling_and_system_prompt(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        screen = app.screen
        screen.query_one("#system-prompt").load_text("Be brief.")
        screen.query_one("#top-p", Input).value = "2"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # bad value: an error, the dialog stays
        assert "top-p" in str(screen.query_one("#settings-error", Static).render())
        screen.query_one("#top-p", Input).value = "0.9"
        screen.query_one("#temperature", Input).value = "0.8"
        screen.query_one("#max-tokens", Input).value = "5"
        screen.query_one("#seed", Input).value = "7"
        screen.query_one("#max-tokens", Input).value = "300"  # more than half the context (512): refused
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        assert "at most 256" in str(screen.query_one("#settings-error", Static).render())
        screen.query_one("#max-tokens", Input).value = "5"
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, SettingsScreen)
        assert app.sampling == Sampling(0.8, 0.9, 5, 7) and app.system_prompt == "Be brief."
        prompts = []
        real = app.session.model.chat_prompt
        app.session.model.chat_prompt = lambda msgs, **kw: prompts.append(msgs) or real(msgs, **kw)
        await send(pilot, "hi")
        assert prompts[0][0] == {"role": "system", "content": "Be brief."}  # the model's own chat template
        assert len(app.chat.turns[1].meta and db(dirs).messages(app.chat.conversation_id)[1].meta) > 0
    store = db(dirs)
    conv = store.conversations()[0]
    reply = store.messages(conv.id)[1]
    assert conv.system_prompt == "Be brief."
    assert reply.meta["sampling"] == {"temperature": 0.8, "top_p": 0.9, "max_tokens": 5, "seed": 7}
    assert reply.meta["n_tokens"] <= 5
    # the settings belong to the conversation (restored when it is resumed), not to every later session
    assert store.settings(conv.id)["sampling"]["seed"] == 7 and store.settings(conv.id)["system_prompt"] == "Be brief."
    assert store.get_state("sampling") is None


def test_chat_template_and_context_trimming(model_path):
    s = ChatSession(model_path, n_ctx=256, threads=1)
    s.load()
    try:
        text = s.model.chat_prompt(s.chat_messages([{"role": "user", "content": "hey"}], "sys"))
        assert text.startswith("<|im_start|>system\nsys<|im_end|>") and text.endswith("<|im_start|>assistant\n")
        long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 30} for i in range(9)]
        tokens, dropped, max_tokens = s.prompt_tokens(long, None, 64)
        assert dropped > 0 and len(tokens) + max_tokens <= 256
    finally:
        s.close()


# -- conversations: persisted, listed, resumed, renamed, deleted, exported ----------------------------------------


@pytest.mark.asyncio
async def test_conversations_resume_rename_delete_export(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await send(pilot, "alpha")
        first = chat.conversation_id
        await pilot.press("ctrl+n")
        assert chat.turns == [] and chat.conversation_id is None
        await send(pilot, "beta")
        await pilot.press("ctrl+o")
        screen = app.screen
        assert isinstance(screen, ConversationsScreen)
        table = screen.query_one(DataTable)
        assert table.row_count == 2
        table.move_cursor(row=1)  # newest first: "alpha" is second
        await pilot.press("r")
        await pilot.pause()
        app.screen.query_one(Input).value = "renamed alpha"
        await pilot.press("enter")
        await pilot.pause()
        assert db(dirs).conversation(first).title == "renamed alpha"
        await pilot.press("m")
        await pilot.press("j")
        exports = sorted((dirs / "data" / "exports").iterdir())
        assert [p.suffix for p in exports] == [".json", ".md"]
        md = next(p for p in exports if p.suffix == ".md").read_text()
        assert md.startswith("# renamed alpha") and "## User\n\nalpha" in md and "## Assistant" in md
        data = json.loads(next(p for p in exports if p.suffix == ".json").read_text())
        assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
        assert data["messages"][1]["sampling"] == GREEDY.to_dict() and "steering" in data["messages"][1]
        await pilot.press("enter")  # resume
        await pilot.pause()
        assert chat.conversation_id == first and [t.content for t in chat.turns][0] == "alpha"
        assert chat.title == "renamed alpha"
        # delete the current one: the screen starts a new conversation
        await pilot.press("ctrl+o")
        table = app.screen.query_one(DataTable)
        row = next(i for i in range(table.row_count) if "renamed" in str(table.get_row_at(i)[0]))
        table.move_cursor(row=row)
        await pilot.press("d")
        await pilot.press("y")
        await pilot.pause()
        assert [c.title for c in db(dirs).conversations()] == ["beta"]
        await pilot.press("escape")
        await pilot.pause()
        assert chat.conversation_id is None and chat.turns == []


@pytest.mark.asyncio
async def test_conversation_theme_and_history_survive_a_restart(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "remember me")
        reply = app.chat.turns[1].content
        app.theme = "gruvbox"
        await pilot.pause()
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.theme == "gruvbox"
        chat_input = app.chat.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("up")  # the prompt history comes from the store
        assert chat_input.text == "remember me"
        chat_input.clear()
        await pilot.press("ctrl+o")
        await pilot.press("enter")
        await pilot.pause()
        assert [t.content for t in app.chat.turns] == ["remember me", reply]
        await send(pilot, "and continue")  # the history goes back into the prompt
        assert len(app.chat.turns) == 4


def test_store_marks_interrupted_replies(dirs):
    store = db(dirs)
    cid = store.new_conversation("t")
    mid = store.add_message(cid, "assistant", "", status="streaming")
    store.update_message(mid, "partial text")
    store.close()
    again = db(dirs)  # the app died mid-reply: the partial text is there, marked stopped when the app starts again
    assert again.recover() == 1
    (m,) = again.messages(cid)
    assert (m.content, m.status) == ("partial text", "stopped")


# -- keyboard, config, palette, mouse, themes ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_config_file_rebinds_keys_and_sets_theme(model_path, dirs):
    cfg_dir = dirs / "config"
    cfg_dir.mkdir()
    (cfg_dir / "tui.toml").write_text('theme = "nord"\n[bindings]\ntoggle_steering = "f9"\nsend = "ctrl+s"\n'
                                      'settings = "f8"\nnewline = "enter"\n[sampling]\nmax_tokens = 3\ntemperature = 0.0\n')
    cfg = load_config()
    assert cfg.errors == [] and cfg.keys("send") == ["ctrl+s"] and cfg.sampling.max_tokens == 3
    app = MoEChatApp(model_path=model_path, n_ctx=512, threads=1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.theme == "nord" and app.sampling.max_tokens == 3
        chat = app.chat
        assert app.session.steering_enabled
        await pilot.press("f9")
        assert not app.session.steering_enabled
        chat_input = chat.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("h", "enter", "i")
        assert chat_input.text == "h\ni" and chat.turns == []
        chat_input.load_text("hello")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and not chat.generating, what="sent with ctrl+s")
        status = str(chat.query_one("#status", Static).render())  # not stable_stats: real numbers
        assert re.search(r"\d+\.\d tok/s · ctx \d+/512", status), status
        await pilot.press("f8")
        assert isinstance(app.screen, SettingsScreen)


@pytest.mark.asyncio
async def test_bad_config_is_reported_and_ignored(model_path, dirs):
    cfg_dir = dirs / "config"
    cfg_dir.mkdir()
    (cfg_dir / "tui.toml").write_text("theme = [unclosed\n")
    app = MoEChatApp(model_path=model_path, n_ctx=512, threads=1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert any("tui.toml" in n.message for n in app._notifications)
        assert app.session.ready
    (cfg_dir / "tui.toml").write_text('[bindings]\nnope = "x"\n[sampling]\ntop_p = 3\n')
    cfg = load_config()
    assert len(cfg.errors) == 2 and "nope" in cfg.errors[1] + cfg.errors[0]


@pytest.mark.asyncio
async def test_command_palette_runs_app_commands(model_path):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert not app.chat.compare_mode
        await pilot.press("ctrl+p")
        await pilot.press(*"Compare mode")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        assert app.chat.compare_mode
        titles = [c.title for c in app.get_system_commands(app.chat)]
        for t in ("Conversations", "Settings", "Toggle steering", "Load steering profile", "Open model", "Regenerate"):
            assert t in titles


@pytest.mark.asyncio
async def test_mouse_clicks(model_path):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "click test")
        chat = app.chat
        assert app.session.steering_enabled
        await pilot.click("#steer-enabled")
        assert not app.session.steering_enabled
        await pilot.click("#side Tab#--content-tab-tab-experts")
        assert chat.query_one("#side").active == "tab-experts"
        # click the [copy] link in the reply's header
        reply_view = chat.turns[1].view
        header = reply_view.query_one(".message-header")
        text = str(header.render())
        await pilot.click(header, offset=(text.index("copy") + 1, 0))
        assert app.clipboard == chat.turns[1].content
        await pilot.press("f3")
        assert not chat.query_one("#side").display


# -- model options -------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_llama_options_are_passed_through(model_path, monkeypatch):
    seen = {}

    def fake_run(self):
        s = self.session
        seen.update(model_path=s.model_path, ngl=s.n_gpu_layers, n_ctx=s.n_ctx, threads=s.threads,
                    k=s.expert_used_count, profiles=self.initial_profiles, system=self.system_prompt,
                    placement=(s.cpu_moe, s.n_cpu_moe, s.override_tensor, s.no_repack))

    monkeypatch.setattr(MoEChatApp, "run", fake_run)
    run_chat(model_path=str(model_path), n_gpu_layers=3, n_ctx=300, threads=1, expert_used_count=1,
             profiles=["p.json"], system_prompt="sys", cpu_moe=True, n_cpu_moe=2, override_tensor=("exps=CPU",),
             no_repack=True)
    assert seen == dict(model_path=model_path, ngl=3, n_ctx=300, threads=1, k=1, profiles=["p.json"], system="sys",
                        placement=(True, 2, ("exps=CPU",), True))
    app = MoEChatApp(model_path=model_path, n_ctx=300, threads=1, expert_used_count=1, stable_stats=True,
                     cpu_moe=True, no_repack=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        model = app.session.model
        assert app.session.n_ctx == 300 and model.llama.n_ctx() >= 300  # llama.cpp rounds the context up
        assert model.n_threads == 1 and model.topology.n_expert_used == 1


def test_default_model_is_the_demo_model(dirs, monkeypatch):
    from moe_gguf.demo import model as demo_model
    from moe_gguf.tui import session as session_mod

    path, notice = session_mod.default_model_path()
    assert path == demo_model.default_model_path() and notice == ""
    # without the package data: a tiny synthetic model, made once, and a notice that says so
    monkeypatch.setattr(demo_model, "DATA_DIR", dirs / "nowhere")
    path, notice = session_mod.default_model_path()
    assert path == dirs / "cache" / "moe-gguf" / "demo" / "tiny-qwen3moe-q8_0.gguf"
    assert path.exists() and ModelTopology.from_gguf(path).is_moe and "random-weight" in notice
    assert session_mod.default_model_path()[0] == path


# -- steering panel ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_steering_panel_add_remove_strength_and_effect_on_next_reply(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        topo = app.session.topology
        await send(pilot, "steer me")
        plain = app.session.last.recorders[0].record.selections.copy()
        layer = topo.moe_layers[-1]
        top = int(np.argmax(plain[layer]))
        assert plain[layer, top] > 0
        panel = chat.query_one(SteeringPanel)
        panel.query_one("#add-layer", Input).value = str(layer)
        panel.query_one("#add-expert", Input).value = str(top)
        panel.query_one("#add-action", Select).value = "disable"
        await press(pilot, "#add-entry")
        assert app.session.profile.experts() == [(layer, top, "disable", None)]
        table = panel.query_one("#steer-table", DataTable)
        assert table.row_count == 1
        # a bias entry, then the strength control
        panel.query_one("#add-layer", Input).value = str(topo.moe_layers[0])
        panel.query_one("#add-expert", Input).value = "0"
        panel.query_one("#add-action", Select).value = "bias"
        panel.query_one("#add-value", Input).value = "2"
        await press(pilot, "#add-entry")
        assert table.row_count == 2
        await press(pilot, "#strength-up")
        assert app.session.strength == 1.25
        assert "2.5" in str(table.get_row_at(1)[3])  # effective value shown
        # the next reply is steered: the disabled expert is never chosen in its layer
        await send(pilot, "steer me")
        steered = app.session.last.recorders[0].record
        assert steered.tokens[layer] > 0 and steered.selections[layer, top] == 0
        meta = db(dirs).messages(chat.conversation_id)[-1].meta
        assert meta["steering"]["enabled"] and meta["steering"]["strength"] == 1.25
        assert len(meta["steering"]["profile"]["entries"]) == 2
        assert "steered" in chat.turns[-1].view.info
        # remove the bias entry with the keyboard
        table.focus()
        table.move_cursor(row=1)
        await pilot.press("delete")
        assert app.session.profile.experts() == [(layer, top, "disable", None)]
        # steering off: the expert is chosen again
        await pilot.press("ctrl+t")
        assert not app.session.steering_enabled and not panel.query_one(Switch).value
        await pilot.press("ctrl+n")
        await send(pilot, "steer me")
        assert (app.session.last.recorders[0].record.selections == plain).all()


@pytest.mark.asyncio
async def test_steering_panel_rejects_bad_entries(model_path):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        panel = app.chat.query_one(SteeringPanel)
        panel.query_one("#add-layer", Input).value = "99"
        panel.query_one("#add-expert", Input).value = "0"
        await press(pilot, "#add-entry")
        error = str(panel.query_one("#steer-error", Static).render())
        assert "layer 99 does not exist" in error and app.session.profile.entries == []
        panel.query_one("#add-layer", Input).value = "1"
        panel.query_one("#add-action", Select).value = "scale"
        await press(pilot, "#add-entry")
        assert "needs a value" in str(panel.query_one("#steer-error", Static).render())
        await press(pilot, "#remove-entry")
        assert "No steered expert" in str(panel.query_one("#steer-error", Static).render())


@pytest.mark.asyncio
async def test_profiles_load_and_save_through_the_file_picker(model_path, dirs, monkeypatch):
    monkeypatch.chdir(dirs)
    topo = ModelTopology.from_gguf(model_path)
    SteeringProfile.for_model(topo, name="quiet").disable(1, 2).scale(0, 5, 2.0).save(dirs / "quiet.json")
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await press(pilot, "#profile-load")
        assert isinstance(app.screen, FilePicker)
        app.screen.query_one("#file-path", Input).value = str(dirs / "quiet.json")
        app.screen.query_one("#file-path", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.profile.name == "quiet" and len(app.session.profile.entries) == 2
        assert "quiet" in str(app.chat.query_one("#profile-name", Static).render())
        await press(pilot, "#profile-save")
        assert isinstance(app.screen, FilePicker)
        app.screen.query_one("#file-path", Input).value = str(dirs / "copy")
        await pilot.press("enter")
        await pilot.pause()
        assert SteeringProfile.load(dirs / "copy.json").experts() == app.session.profile.experts()
        await press(pilot, "#profile-new")
        assert app.session.profile.entries == []


@pytest.mark.asyncio
async def test_profiles_from_the_command_line(model_path, dirs):
    topo = ModelTopology.from_gguf(model_path)
    SteeringProfile.for_model(topo, name="a").disable(1, 2).save(dirs / "a.json")
    SteeringProfile.for_model(topo, name="b").force(0, 4).save(dirs / "b.json")
    app = make_app(model_path, profiles=[str(dirs / "a.json"), str(dirs / "b.json")])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await pilot.pause()
        assert app.session.profile.experts() == [(0, 4, "force", None), (1, 2, "disable", None)]


# -- compare mode --------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_compare_mode_side_by_side_in_one_batch(model_path, dirs):
    topo = ModelTopology.from_gguf(model_path)
    layer = topo.moe_layers[-1]
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        await pilot.press("ctrl+l")
        assert chat.compare_mode and "compare" in str(chat.query_one("#status", Static).render())
        await send(pilot, "compare")  # no steering yet: both sides unsteered
        baseline = chat.turns[-1].view.sides[1].content
        app.session.add_entry(layer, 5, "force")
        chat.refresh_steering()
        batches = []
        real_stream = app.session.ctx.stream
        app.session.ctx.stream = lambda reqs, **kw: batches.append(list(reqs)) or real_stream(reqs, **kw)
        await pilot.press("ctrl+n")
        await send(pilot, "compare")
        view = chat.turns[-1].view
        assert isinstance(view, CompareView)
        steered_view, unsteered_view = view.sides
        # one stream() call, two requests: seq 0 steered, seq 1 not
        assert len(batches) == 1 and [r.profile is not None for r in batches[0]] == [True, False]
        assert unsteered_view.content == baseline  # per-sequence steering leaves seq 1 untouched
        rec0, rec1 = (r.record for r in app.session.last.recorders)
        assert rec0.selections[layer, 5] == rec0.tokens[layer] > 0  # forced: every token
        heatmap = chat.query_one(ExpertHeatmap)
        assert heatmap.base is not None  # shows steered − unsteered
        saved = db(dirs).messages(chat.conversation_id)[-1]
        assert saved.content == steered_view.content and saved.meta["compare"] == baseline
        assert saved.meta["steering"]["enabled"]
        # resumed conversations show the compare reply side by side again
        await chat.load_conversation(chat.conversation_id)
        assert isinstance(chat.turns[-1].view, CompareView)


# -- expert activity: heatmap and per-token view -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_heatmap_and_token_view_follow_the_reply(model_path):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        topo = app.session.topology
        shown = []
        heatmap = chat.query_one(ExpertHeatmap)
        real = heatmap.set_data
        heatmap.set_data = lambda sel, routed, **kw: shown.append(int(routed.max())) or real(sel, routed, **kw)
        await send(pilot, "experts")
        assert shown and shown[-1] > 0  # updated while the reply streamed, and at the end
        freq = heatmap.freq
        for il in topo.moe_layers:  # each token selects n_expert_used experts per MoE layer
            assert freq[il].sum() == pytest.approx(topo.n_expert_used)
        rendered = heatmap.render().plain
        assert f"L{topo.moe_layers[0]}" in rendered and "tok" in rendered
        chat.show_tab("tab-tokens")
        await pilot.pause()
        inspector = chat.query_one(TokenInspector)
        n_tokens = len(app.session.last.tokens[0])
        assert inspector.token_list.row_count == n_tokens
        inspector.token_list.focus()
        inspector.token_list.move_cursor(row=1)
        await pilot.pause()
        routes = inspector.routes_table
        assert routes.row_count == len(topo.moe_layers)
        first = routes.get_row_at(0)
        assert first[0] == f"L{topo.moe_layers[0]}" and str(first[1]).count("(") == topo.n_expert_used
        trace = app.session.token_routes(1)
        assert trace[0].token == app.session.last.tokens[0][1]
        # click a heatmap cell: the steering form is prefilled with that layer / expert
        chat.show_tab("tab-experts")
        await pilot.pause()
        await wait_for(pilot, lambda: heatmap.size.width > 0, what="the heatmap tab")
        await pilot.click(heatmap, offset=(5 + heatmap.cell_width * 3, 3))
        panel = chat.query_one(SteeringPanel)
        assert panel.query_one("#add-layer", Input).value == str(topo.moe_layers[1])
        assert panel.query_one("#add-expert", Input).value == "3"


# -- steering schedule ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_schedule_after_tokens_and_after_text(model_path, dirs):
    app = make_app(model_path, sampling=Sampling(0.0, 1.0, 16, 0))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        app.session.add_entry(1, 2, "bias", 1.0)
        chat.refresh_steering()
        panel = chat.query_one(SteeringPanel)
        panel.query_one("#sched-apply", Select).value = "generated"
        panel.query_one("#sched-tokens", Input).value = "4"
        await pilot.pause()
        assert app.session.profile.schedule.apply_to == "generated"
        assert app.session.profile.schedule.after_tokens == 4
        await send(pilot, "schedule")
        meta = db(dirs).messages(chat.conversation_id)[-1].meta
        assert meta["steered_from"] == 4 and meta["steering"]["profile"]["schedule"]["after_tokens"] == 4
        inspector = chat.query_one(TokenInspector)
        col = [str(inspector.token_list.get_row_at(i)[2]) for i in range(inspector.token_list.row_count)]
        assert col[:4] == ["", "", "", ""] and set(col[4:]) == {"yes"}
        # after a text: steering starts once the reply contains it
        text = chat.turns[-1].content
        panel.query_one("#sched-tokens", Input).value = "0"
        panel.query_one("#sched-when", Select).value = "text"
        await pilot.pause()
        panel.query_one("#sched-text", Input).value = text[:2]
        await pilot.pause()
        assert app.session.profile.schedule.after_text == text[:2]
        await send(pilot, "schedule")
        meta = db(dirs).messages(chat.conversation_id)[-1].meta
        assert meta["steered_from"] is not None and meta["steered_from"] >= 1


# -- bad input: clear messages, the app keeps running, nothing is lost ---------------------------------------------


@pytest.mark.asyncio
async def test_unreadable_profile_and_profile_for_another_model(model_path, dirs):
    (dirs / "broken.json").write_text("{not json")
    other_model_profile(dirs / "other.json")
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        app.session.add_entry(1, 1, "disable")
        assert not app.load_profile(dirs / "broken.json")
        error = str(app.chat.query_one("#steer-error", Static).render())
        assert "invalid JSON" in error and app.chat.query_one("#steer-error").has_class("-visible")
        assert app.session.profile.experts() == [(1, 1, "disable", None)]  # the working profile is kept
        assert not app.load_profile(dirs / "other.json")
        assert "made for a different model" in str(app.chat.query_one("#steer-error", Static).render())
        await pilot.pause()
        assert any("another model" in (n.title or "") for n in app._notifications)
        assert not app.load_profile(dirs / "missing.json")
        assert "no such profile" in str(app.chat.query_one("#steer-error", Static).render())
        await send(pilot, "still works")
        assert len(app.chat.turns) == 2


@pytest.mark.asyncio
async def test_missing_model_then_open_a_good_one(model_path, dirs):
    app = make_app(dirs / "nope.gguf")
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        chat = app.chat
        assert not app.session.ready
        panel = chat.query_one("#error-panel", Static)
        assert panel.has_class("-visible") and "no such file" in str(panel.render())
        chat.query_one(ChatInput).load_text("hello?")
        await pilot.press("enter")
        assert chat.turns == [] and chat.query_one(ChatInput).text == "hello?"  # the text is kept
        assert any("No model loaded" in n.message for n in app._notifications)
        app.load_model(model_path)
        await wait_for(pilot, lambda: app.session.ready, what="the good model")
        await pilot.pause()
        assert not panel.has_class("-visible")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2 and not chat.generating, what="reply")


@pytest.mark.asyncio
async def test_non_moe_model_is_refused_in_the_ui(dirs):
    path = write_dense_gguf(dirs / "dense.gguf")
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        text = str(app.chat.query_one("#error-panel", Static).render())
        assert "without routed experts" in text and "MoE" in text
        assert app.is_running


@pytest.mark.asyncio
async def test_failed_generation_keeps_the_conversation(model_path, dirs):
    app = make_app(model_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        real = app.session.generate

        def broken(*a, **kw):
            for i, u in enumerate(real(*a, **kw)):
                if i == 3:
                    raise RuntimeError("decode failed")
                yield u

        app.session.generate = broken
        chat = app.chat
        chat.query_one(ChatInput).load_text("break")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not chat.generating and len(chat.turns) == 2, what="failure")
        assert any("decode failed" in n.message for n in app._notifications)
        app.session.generate = real
        await send(pilot, "after")
        assert len(chat.turns) == 4
    store = db(dirs)
    msgs = store.messages(store.conversations()[0].id)
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0].content == "break" and msgs[1].status == "stopped" and msgs[1].content


def test_control_characters_are_shown_not_sent_to_the_terminal():
    assert visible("a\x08b\x1b[2Jc\n\td\x7f") == "a\u2408b\u241b[2Jc\n\td\u2421"
    assert code_blocks("no code") == []
