"""The main screen: conversation, message input, status line and the side panel (steering, experts, tokens).

Generation runs in a worker thread (ChatSession.generate); each snapshot is posted back with call_from_thread
and the reply is written to the conversation store while it streams.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_gguf.tui.screens.conversations import ConversationsChanged, ConversationsScreen
from moe_gguf.tui.screens.dialogs import FilePicker
from moe_gguf.tui.screens.settings import SettingsScreen
from moe_gguf.tui.session import ReplyUpdate
from moe_gguf.tui.widgets.chat_input import ChatInput
from moe_gguf.tui.widgets.heatmap import ExpertHeatmap
from moe_gguf.tui.widgets.message import CompareView, MessageView
from moe_gguf.tui.widgets.steering import SteeringPanel
from moe_gguf.tui.widgets.tokens import TokenInspector
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from moe_gguf.errors import ProfileError

SAVE_EVERY_S = 0.25  # a streaming reply is written to the store at least this often
UI_EVERY_S = 0.05  # and shown at least this often


@dataclass
class Turn:
    mid: int
    role: str
    content: str
    view: Any
    meta: dict = field(default_factory=dict)
    status: str = "done"


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+r", "regenerate", "Regen", id="regenerate"),
        Binding("ctrl+g", "edit_last", "Edit", id="edit_last"),
        Binding("f5", "copy_reply", "Copy", id="copy_reply"),
        Binding("ctrl+b", "copy_code", "Copy code", id="copy_code", show=False),
        Binding("ctrl+t", "toggle_steering", "Steer", id="toggle_steering"),
        Binding("ctrl+l", "compare", "Compare", id="compare"),
        Binding("ctrl+n", "new_chat", "New", id="new_chat"),
        Binding("ctrl+o", "conversations", "Chats", id="conversations"),
        Binding("ctrl+s", "settings", "Settings", id="settings"),
        Binding("f3", "toggle_panel", "Panel", id="toggle_panel", show=False),
        Binding("f4", "focus_input", "Input", id="focus_input", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.turns: list[Turn] = []
        self.conversation_id: int | None = None
        self.generating = False
        self.compare_mode = False
        self._stop = threading.Event()
        self._last_stats = ""
        self._saved_at = 0.0
        self._saved_text = False
        self._token_texts: list[str] = []

    # -- layout --

    def compose(self) -> ComposeResult:
        app = self.app
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                with VerticalScroll(id="messages"):
                    yield Static("", id="error-panel")
                    yield Static(self._welcome(), id="welcome")
                yield ChatInput(id="input", history=app.store.prompt_history(),  # type: ignore[attr-defined]
                                send_keys=app.config.keys("send"), newline_keys=app.config.keys("newline"))  # type: ignore[attr-defined]
                yield Static("", id="status")
            with TabbedContent(id="side", initial="tab-steer"):
                with TabPane("Steer", id="tab-steer"):
                    with VerticalScroll():
                        yield SteeringPanel(id="steering")
                with TabPane("Experts", id="tab-experts"):
                    with VerticalScroll():
                        yield ExpertHeatmap(id="heatmap")
                with TabPane("Tokens", id="tab-tokens"):
                    yield TokenInspector(id="tokens")
        yield Footer()

    def _welcome(self) -> str:
        keys = self.app.config  # type: ignore[attr-defined]
        return (f"Type a message and press [b]{keys.keys('send')[0]}[/] "
                f"([b]{keys.keys('newline')[0]}[/] for a newline). "
                "[b]ctrl+p[/]: all commands. Steer experts in the side panel.")

    def on_mount(self) -> None:
        self.query_one("#messages", VerticalScroll).anchor()
        self.query_one(ChatInput).focus()
        self.refresh_steering()
        self.update_status()
        self.app.chat_mounted()  # type: ignore[attr-defined]

    @property
    def session(self):
        return self.app.session  # type: ignore[attr-defined]

    @property
    def store(self):
        return self.app.store  # type: ignore[attr-defined]

    # -- model state (called by the app) --

    def model_loading(self, name: str) -> None:
        self.show_error("")
        self.update_status(f"loading {name}…")

    def model_ready(self) -> None:
        topo = self.session.topology
        self.query_one(ExpertHeatmap).set_shape(topo.moe_layers, topo.n_expert)
        self._last_stats = ""
        self.refresh_steering()
        self.update_status()
        self.sub_title = self.session.model_name

    def show_error(self, message: str) -> None:
        panel = self.query_one("#error-panel", Static)
        panel.update(message)
        panel.set_class(bool(message), "-visible")

    # -- status --

    def update_status(self, stats: str | None = None) -> None:
        if stats is not None:
            self._last_stats = stats
        s = self.session
        parts = [s.model_name if s.ready else "no model"]
        if s.ready:
            if s.steering_active:
                parts.append(f"[b]steering ON[/] {len(s.profile.entries)} experts ×{s.strength:g}")
            elif s.steering_enabled:
                parts.append("steering on (no experts)")
            else:
                parts.append("steering off")
        if self.compare_mode:
            parts.append("[b]compare[/]")
        if self._last_stats:
            parts.append(self._last_stats)
        self.query_one("#status", Static).update(" · ".join(parts))

    def _stats(self, u: ReplyUpdate) -> str:
        if self.app.stable_stats:  # type: ignore[attr-defined]
            rate = "-- tok/s"
        else:
            rate = "-- tok/s" if u.tokens_per_s is None else f"{u.tokens_per_s:.1f} tok/s"
        return f"{rate} · ctx {u.ctx_used}/{u.n_ctx}"

    # -- sending --

    async def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        event.stop()
        if not self.session.ready:
            self.notify("No model loaded: open one with ctrl+p → Open model", severity="error")
            return
        if self.generating:
            self.notify("Still generating: press Esc to stop", severity="warning")
            return
        chat_input = event.chat_input
        chat_input.remember(event.text)
        chat_input.clear()
        await self.send(event.text)

    async def send(self, text: str) -> None:
        cid = self._ensure_conversation(text)
        mid = self.store.add_message(cid, "user", text)
        view = MessageView("user", text, mid=mid)
        await self._mount(view)
        self.turns.append(Turn(mid, "user", text, view))
        await self._start_reply()

    def _ensure_conversation(self, first_text: str) -> int:
        if self.conversation_id is None:
            title = " ".join(first_text.split())[:60] or "conversation"
            self.conversation_id = self.store.new_conversation(title, model=self.session.model_name,
                                                               system_prompt=self.app.system_prompt)  # type: ignore[attr-defined]
            self.title = title
        return self.conversation_id

    async def _mount(self, widget) -> None:
        messages = self.query_one("#messages", VerticalScroll)
        welcome = self.query("#welcome")
        if welcome:
            await welcome.remove()
        await messages.mount(widget)
        messages.scroll_end(animate=False)

    async def _start_reply(self) -> None:
        app = self.app
        history = [{"role": t.role, "content": t.content} for t in self.turns]
        compare = self.compare_mode
        sampling = app.sampling  # type: ignore[attr-defined]
        meta: dict[str, Any] = {"sampling": sampling.to_dict(), "steering": self.session.steering_info(),
                                "system_prompt": app.system_prompt}  # type: ignore[attr-defined]
        if compare:
            meta["compare"] = ""
        mid = self.store.add_message(self.conversation_id, "assistant", "", status="streaming", meta=meta)
        view = CompareView(mid=mid, streaming=True) if compare else MessageView("assistant", "", mid=mid, streaming=True)
        await self._mount(view)
        turn = Turn(mid, "assistant", "", view, meta, status="streaming")
        self.turns.append(turn)
        self.query_one(ExpertHeatmap).clear("generating…")
        self.query_one(TokenInspector).clear()
        self._token_texts = []
        self.generating = True
        self._stop = threading.Event()
        self._saved_at = time.monotonic()
        self._saved_text = False
        self.update_status("starting…")
        self._generate(history, compare, turn, sampling, app.system_prompt)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, history, compare, turn, sampling, system_prompt) -> None:
        """Worker thread: run the model, post snapshots to the UI thread (at most every UI_EVERY_S)."""
        app, stop = self.app, self._stop
        shown = 0.0
        try:
            for update in self.session.generate(history, system_prompt=system_prompt, sampling=sampling,
                                                compare=compare, stop=stop):
                now = time.monotonic()
                if update.done or now - shown >= UI_EVERY_S:
                    app.call_from_thread(self._apply_update, turn, update)
                    shown = now
        except Exception as e:  # bad prompt, context full, decode failure: shown, the conversation stays
            try:
                app.call_from_thread(self._apply_failure, turn, e)
            except RuntimeError:  # the app is gone
                pass

    async def _apply_update(self, turn: Turn, u: ReplyUpdate) -> None:
        texts = u.texts
        if isinstance(turn.view, CompareView):
            await turn.view.stream_to(texts[0], texts[1] if len(texts) > 1 else "")
        else:
            await turn.view.stream_to(texts[0])
        turn.content = texts[0]
        stats = self._stats(u)
        self.update_status(stats)
        self._show_routing(u)
        self._show_tokens(u)
        now = time.monotonic()
        first_text = bool(texts[0]) and not self._saved_text
        if u.done or first_text or now - self._saved_at >= SAVE_EVERY_S:
            self._saved_text = bool(texts[0])
            self._save_turn(turn, u)
            self._saved_at = now
        if u.done:
            await self._finish(turn, u)

    def _save_turn(self, turn: Turn, u: ReplyUpdate) -> None:
        if len(u.texts) > 1:
            turn.meta["compare"] = u.texts[1]
        status = "streaming"
        if u.done:
            status = "stopped" if u.stopped else "done"
            turn.meta.update({"n_tokens": len(u.tokens[0]), "finish": u.finish[0], "steered_from": u.steered_from[0],
                              "n_prompt": u.n_prompt, "tokens_per_s": u.tokens_per_s, "dropped_messages": u.dropped})
        try:
            self.store.update_message(turn.mid, u.texts[0], status=status, meta=turn.meta)
        except Exception as e:  # disk full, database locked: keep going, say so
            self.notify(f"Could not save the reply: {e}", severity="error")

    def _info(self, u: ReplyUpdate, meta: dict) -> str:
        n = len(u.tokens[0])
        parts = [f"{n} tok"]
        if u.tokens_per_s is not None and not self.app.stable_stats:  # type: ignore[attr-defined]
            parts.append(f"{u.tokens_per_s:.1f} tok/s")
        parts.append(_steer_label(meta))
        if u.stopped:
            parts.append("stopped")
        if u.dropped:
            parts.append(f"{u.dropped} old messages left out")
        return " · ".join(parts)

    async def _finish(self, turn: Turn, u: ReplyUpdate) -> None:
        info = self._info(u, turn.meta)
        if isinstance(turn.view, CompareView):
            await turn.view.finish(u.texts[0], u.texts[1] if len(u.texts) > 1 else "", info)
        else:
            await turn.view.finish(u.texts[0], info)
        turn.status = "stopped" if u.stopped else "done"
        self.generating = False
        if u.stopped:
            self.notify("Stopped")

    def _apply_failure(self, turn: Turn, error: Exception) -> None:
        self.generating = False
        msg = f"Generation failed: {error}"
        self.notify(msg, severity="error", timeout=8)
        self.update_status("failed")
        turn.status = "error"
        # keep what was generated; an empty reply is removed so the conversation can be resent
        if not turn.content:
            self.store.delete_from(self.conversation_id, turn.mid)
            self.turns.remove(turn)
            turn.view.remove()
        else:
            self.store.update_message(turn.mid, turn.content, status="stopped", meta=turn.meta)

    # -- routing views --

    def _show_routing(self, u: ReplyUpdate) -> None:
        heatmap = self.query_one(ExpertHeatmap)
        marks = self.session.steered_cells() if self.session.steering_active else {}
        n = len(u.tokens[0])
        if len(u.selections) > 1:
            heatmap.set_data(u.selections[0], u.routed[0], baseline=(u.selections[1], u.routed[1]), marks=marks,
                             title=f"steered − unsteered routing, {n} tokens")
        else:
            heatmap.set_data(u.selections[0], u.routed[0], marks=marks, title=f"routing of this reply, {n} tokens")

    def _show_tokens(self, u: ReplyUpdate) -> None:
        toks = u.tokens[0]
        for t in toks[len(self._token_texts):]:
            self._token_texts.append(self.session.token_text(t))
        self.query_one(TokenInspector).set_tokens(self._token_texts, u.steered_from[0])

    def on_token_inspector_selected(self, event: TokenInspector.Selected) -> None:
        i = event.index
        if i >= len(self._token_texts):
            return
        routes = self.session.token_routes(i)
        self.query_one(TokenInspector).show_routes(i, self._token_texts[i], routes, self.session.steered_cells())

    def on_expert_heatmap_picked(self, event: ExpertHeatmap.Picked) -> None:
        self.show_tab("tab-steer")
        self.query_one(SteeringPanel).pick(event.layer, event.expert)

    # -- actions --

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating  # shown (and Esc taken) only while generating
        return True

    def _last(self, role: str) -> Turn | None:
        return next((t for t in reversed(self.turns) if t.role == role), None)

    async def _truncate_from(self, turn: Turn) -> None:
        """Remove `turn` and every later message, from the screen and the store."""
        i = self.turns.index(turn)
        for t in self.turns[i:]:
            await t.view.remove()
        del self.turns[i:]
        if self.conversation_id is not None:
            self.store.delete_from(self.conversation_id, turn.mid)

    async def action_regenerate(self, turn: Turn | None = None) -> None:
        if self._busy():
            return
        turn = turn or self._last("assistant")
        if turn is None:
            self.notify("No reply to regenerate yet", severity="warning")
            return
        await self._truncate_from(turn)
        if not self.turns:
            return
        await self._start_reply()

    async def action_edit_last(self, turn: Turn | None = None) -> None:
        if self._busy():
            return
        turn = turn or self._last("user")
        if turn is None:
            self.notify("No message to edit yet", severity="warning")
            return
        text = turn.content
        await self._truncate_from(turn)
        chat_input = self.query_one(ChatInput)
        chat_input.load_text(text)
        chat_input.move_cursor(chat_input.document.end)
        chat_input.focus()
        self.notify("Edit the message and press Enter to resend it")

    async def on_message_view_action(self, event: MessageView.Action) -> None:
        view = event.view
        parent = next((a for a in view.ancestors if isinstance(a, CompareView)), None)
        view = parent or view
        turn = next((t for t in self.turns if t.view is view), None)
        if turn is None:
            return
        if event.action == "edit" and turn.role == "user":
            await self.action_edit_last(turn)
        elif event.action == "regenerate" and turn.role == "assistant":
            await self.action_regenerate(turn)

    def _busy(self) -> bool:
        if self.generating:
            self.notify("Still generating: press Esc to stop first", severity="warning")
            return True
        if not self.session.ready:
            self.notify("No model loaded", severity="error")
            return True
        return False

    def action_copy_reply(self) -> None:
        turn = self._last("assistant")
        if turn is None:
            self.notify("No reply to copy yet", severity="warning")
            return
        turn.view.action_copy()

    def action_copy_code(self) -> None:
        turn = self._last("assistant")
        if turn is None:
            self.notify("No reply yet", severity="warning")
            return
        turn.view.action_copy_code()

    def action_toggle_steering(self) -> None:
        s = self.session
        s.steering_enabled = not s.steering_enabled
        self.refresh_steering()
        self.notify(f"Steering {'on' if s.steering_enabled else 'off'} (from the next reply)")

    def action_compare(self) -> None:
        self.compare_mode = not self.compare_mode
        if self.compare_mode and not self.session.steering_active:
            self.notify("Compare mode on, but no steering is active: both sides will match", severity="warning")
        else:
            self.notify(f"Compare mode {'on: steered and unsteered side by side' if self.compare_mode else 'off'}")
        self.update_status()

    def show_tab(self, tab: str) -> None:
        """Show a side panel tab (tab-steer, tab-experts, tab-tokens)."""
        side = self.query_one("#side", TabbedContent)
        side.display = True
        focused = self.focused
        if focused is not None and side in focused.ancestors:
            self.query_one(ChatInput).focus()  # the panel follows focus: move it out of the old tab first
        side.active = tab

    def action_toggle_panel(self) -> None:
        side = self.query_one("#side")
        side.display = not side.display

    def action_focus_input(self) -> None:
        self.query_one(ChatInput).focus()

    async def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Still generating: press Esc to stop first", severity="warning")
            return
        await self.load_conversation(None)

    def action_conversations(self) -> None:
        if self.generating:
            self.notify("Still generating: press Esc to stop first", severity="warning")
            return

        async def done(cid: int | None) -> None:
            if cid is not None:
                await self.load_conversation(cid)

        self.app.push_screen(ConversationsScreen(self.store, current=self.conversation_id), done)

    async def conversations_changed(self, event: ConversationsChanged) -> None:
        """A conversation was renamed or deleted in the conversations dialog (forwarded by the app)."""
        if event.deleted is not None and event.deleted == self.conversation_id:
            await self.load_conversation(None)
        elif self.conversation_id is not None:
            conv = self.store.conversation(self.conversation_id)
            if conv:
                self.title = conv.title

    def action_settings(self) -> None:
        app = self.app

        def done(result) -> None:
            if result is None:
                return
            system_prompt, sampling = result
            app.set_settings(system_prompt, sampling)  # type: ignore[attr-defined]
            if self.conversation_id is not None:
                self.store.set_system_prompt(self.conversation_id, system_prompt)
            self.notify("Settings saved (from the next reply)")

        app.push_screen(SettingsScreen(app.system_prompt, app.sampling), done)  # type: ignore[attr-defined]

    async def load_conversation(self, cid: int | None) -> None:
        """Show a stored conversation (None: a new, empty one)."""
        messages = self.query_one("#messages", VerticalScroll)
        for t in self.turns:
            await t.view.remove()
        self.turns = []
        await messages.query("#welcome").remove()
        self.conversation_id = cid
        self.query_one(ExpertHeatmap).clear()
        self.query_one(TokenInspector).clear()
        self._last_stats = ""
        if cid is None:
            self.title = "moe-gguf chat"
            await messages.mount(Static(self._welcome(), id="welcome"))
            self.update_status()
            return
        conv = self.store.conversation(cid)
        self.title = conv.title if conv else "conversation"
        if conv is not None:
            self.app.system_prompt = conv.system_prompt  # type: ignore[attr-defined]
        for m in self.store.messages(cid):
            if m.role == "assistant" and "compare" in m.meta:
                view = CompareView(m.content, m.meta["compare"], mid=m.id, info=_stored_info(m))
            else:
                view = MessageView(m.role, m.content, mid=m.id, info=_stored_info(m) if m.role == "assistant" else "")
            await messages.mount(view)
            self.turns.append(Turn(m.id, m.role, m.content, view, m.meta, m.status))
        messages.scroll_end(animate=False)
        self.update_status()

    # -- steering panel --

    def refresh_steering(self, error: str = "") -> None:
        s = self.session
        self.query_one(SteeringPanel).show(s.profile, enabled=s.steering_enabled, strength=s.strength,
                                           path=s.profile_path.name if s.profile_path else None, error=error)
        self.query_one(ExpertHeatmap).set_marks(s.steered_cells() if s.steering_active else {})
        self.update_status()

    def on_steering_panel_request(self, event: SteeringPanel.Request) -> None:
        event.stop()
        s, a = self.session, event.args
        try:
            if event.action == "load":
                self.pick_profile()
                return
            if event.action == "save":
                self.save_profile_dialog()
                return
            if event.action == "new":
                s.new_profile()
            elif event.action == "enable":
                s.steering_enabled = bool(a["enabled"])
            elif event.action == "strength":
                s.set_strength(a["strength"])
            elif event.action == "schedule":
                s.set_schedule(a["apply_to"], a["after_tokens"], a["after_text"])
            elif event.action == "add":
                s.add_entry(a["layer"], a["expert"], a["action"], a["value"])
            elif event.action == "remove":
                s.remove_entry(a["index"])
        except (ProfileError, ValueError, IndexError) as e:
            self.refresh_steering(error=str(e))
            self.notify(str(e), severity="error", timeout=8)
            return
        self.refresh_steering()

    def pick_profile(self) -> None:
        start = self.session.profile_path.parent if self.session.profile_path else Path.cwd()

        def done(path: Path | None) -> None:
            if path is not None:
                self.app.load_profile(path)  # type: ignore[attr-defined]

        self.app.push_screen(FilePicker("Load a steering profile (.json)", start=start, suffixes=(".json",)), done)

    def save_profile_dialog(self) -> None:
        s = self.session
        start = s.profile_path.parent if s.profile_path else Path.cwd()
        name = s.profile_path.name if s.profile_path else f"{s.profile.name or 'profile'}.json"

        def done(path: Path | None) -> None:
            if path is None:
                return
            try:
                saved = s.save_profile(path)
            except ProfileError as e:
                self.notify(str(e), severity="error", timeout=8)
                return
            self.refresh_steering()
            self.notify(f"Saved the profile to {saved}")

        self.app.push_screen(FilePicker("Save the steering profile", start=start, suffixes=(".json",), save=True,
                                        default_name=name), done)


def _steer_label(meta: dict) -> str:
    steer = meta.get("steering") or {}
    if not steer.get("enabled"):
        return "unsteered"
    prof = steer.get("profile") or {}
    return f"steered: {prof.get('name') or 'profile'} ×{steer.get('strength', 1.0):g}"


def _stored_info(m) -> str:
    parts = []
    if m.meta.get("n_tokens") is not None:
        parts.append(f"{m.meta['n_tokens']} tok")
    parts.append(_steer_label(m.meta))
    if m.status == "stopped":
        parts.append("stopped")
    return " · ".join(parts)
