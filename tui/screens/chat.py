"""The main screen: conversation, message input, status line and the side panel (steering, experts, tokens).

Generation runs in a worker thread (ChatSession.generate); each snapshot is posted back with call_from_thread
and the reply is written to the conversation store while it streams.

A conversation owns its settings (model path, steering, compare mode, sampling, system prompt): they are saved
with it whenever they change and restored when it is resumed. Nothing is deleted before the user confirms it:
editing a message deletes it (and what follows) only when the edited text is sent, and regenerating an older
reply asks first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from moe_gguf.errors import ProfileError
from moe_gguf.formats.records import TokenTrace
from moe_gguf.tui.config import Sampling
from moe_gguf.tui.screens.conversations import ConversationsChanged, ConversationsScreen
from moe_gguf.tui.screens.dialogs import Confirm, FilePicker
from moe_gguf.tui.screens.settings import SettingsScreen
from moe_gguf.tui.session import ChatSession, ReplyUpdate
from moe_gguf.tui.store import ConversationStore, Message
from moe_gguf.tui.widgets.chat_input import ChatInput
from moe_gguf.tui.widgets.heatmap import ExpertHeatmap
from moe_gguf.tui.widgets.message import CompareView, MessageView
from moe_gguf.tui.widgets.steering import SteeringPanel
from moe_gguf.tui.widgets.tokens import TokenInspector

if TYPE_CHECKING:
    from moe_gguf.tui.app import MoEChatApp

SAVE_EVERY_S = 0.25  # a streaming reply is written to the store at least this often
UI_EVERY_S = 0.05  # and shown at least this often
NARROW = 100  # below this many columns the side panel is an overlay, hidden until asked for


@dataclass
class Turn:
    mid: int
    role: str
    content: str
    view: MessageView | CompareView
    meta: dict = field(default_factory=dict)
    status: str = "done"
    routing: dict | None = None


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
        Binding("f3", "toggle_panel", "Panel", id="toggle_panel"),
        Binding("f4", "focus_input", "Input", id="focus_input", show=False),
        Binding("f2", "next_tab", "Tab", id="next_tab"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.turns: list[Turn] = []
        self.conversation_id: int | None = None
        self.generating = False
        self.compare_mode = False
        self.editing: Turn | None = None  # a message being edited: it and later ones are replaced on send
        self.panel_open: bool | None = None  # None: the default for the width (open when wide, closed when narrow)
        self._stop = threading.Event()
        self._current: Turn | None = None  # the reply being generated
        self._last_stats = ""
        self._saved_at = 0.0
        self._saved_text = False
        self._token_texts: list[str] = []
        self._token_steered: int | None = None
        self._stored_routes: list[list] | None = None  # per-token routes of a stored reply (a resumed chat)
        self._after_load: list[str] = []  # what a resume could not restore, told once the model is loaded

    # -- typed access to the app --

    @property
    def chat_app(self) -> MoEChatApp:
        return cast("MoEChatApp", self.app)

    @property
    def session(self) -> ChatSession:
        return self.chat_app.session

    @property
    def store(self) -> ConversationStore:
        return self.chat_app.store

    # -- layout --

    def compose(self) -> ComposeResult:
        app = self.chat_app
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                with VerticalScroll(id="messages"):
                    yield Static("", id="error-panel")
                    yield Static(self._welcome(), id="welcome")
                yield Static("", id="edit-banner")
                yield ChatInput(id="input", history=app.store.prompt_history(),
                                send_keys=app.config.keys("send"), newline_keys=app.config.keys("newline"))
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
        keys = self.chat_app.config
        return (f"Type a message and press [b]{keys.keys('send')[0]}[/] "
                f"([b]{keys.keys('newline')[0]}[/] for a newline). "
                "[b]ctrl+p[/]: all commands. Steer experts in the side panel "
                f"([b]{keys.keys('toggle_panel')[0]}[/]).")

    def on_mount(self) -> None:
        self.query_one("#messages", VerticalScroll).anchor()
        self.query_one(ChatInput).focus()
        self.refresh_steering()
        self.update_status()
        self._apply_layout()
        self.chat_app.chat_mounted()

    def on_resize(self, event: events.Resize) -> None:
        self._apply_layout()

    @property
    def narrow(self) -> bool:
        return self.size.width < NARROW

    def _apply_layout(self) -> None:
        side = self.query_one("#side", TabbedContent)
        narrow = self.narrow
        side.set_class(narrow, "-overlay")
        side.display = self.panel_open if self.panel_open is not None else not narrow

    def on_screen_resume(self) -> None:
        """Back from a dialog: focus goes back to the input unless it was somewhere that still shows."""
        focused = self.focused
        if focused is None or not focused.display or not focused.is_on_screen:
            self.query_one(ChatInput).focus()

    # -- model state (called by the app) --

    def model_loading(self, name: str) -> None:
        self.show_error("")
        self.update_status(f"loading {name}…")

    def model_ready(self) -> None:
        topo = self.session.topology
        assert topo is not None
        self.query_one(ExpertHeatmap).set_shape(topo.moe_layers, topo.n_expert)
        self._last_stats = ""
        self.refresh_steering()
        self.update_status()
        self.sub_title = self.session.model_name
        self._show_stored_routing()

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
                parts.append(f"[b]steering ON[/] {len(s.profile.entries)} experts ×{s.strength:g}"
                             + (" after thinking" if s.profile.schedule.after_text == "</think>" else ""))
            elif s.steering_enabled:
                parts.append("steering on (no experts)")
            else:
                parts.append("steering off")
        if self.compare_mode:
            parts.append("[b]compare[/]")
        if self.chat_app.sampling.seed is not None:
            parts.append(f"seed {self.chat_app.sampling.seed}")
        if self._last_stats:
            parts.append(self._last_stats)
        self.query_one("#status", Static).update(" · ".join(parts))

    def _stats(self, u: ReplyUpdate) -> str:
        if self.chat_app.stable_stats:
            rate = "-- tok/s"
        else:
            rate = "-- tok/s" if u.tokens_per_s is None else f"{u.tokens_per_s:.1f} tok/s"
        return f"{rate} · ctx {u.ctx_used}/{u.n_ctx}"

    # -- conversation settings --

    def chat_settings(self) -> dict[str, Any]:
        app = self.chat_app
        return {**self.session.chat_settings(), "compare": self.compare_mode, "sampling": app.sampling.to_dict(),
                "system_prompt": app.system_prompt}

    def save_settings(self) -> None:
        """Store the current settings with the conversation (called after every change)."""
        if self.conversation_id is None:
            return
        try:
            self.store.set_settings(self.conversation_id, self.chat_settings())
        except Exception as e:  # disk full, database locked: keep going, say so
            self.notify(f"Could not save the conversation's settings: {e}", severity="error")

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
        if self.editing is not None:  # the edit is sent: now the old message and what follows go
            turn, self.editing = self.editing, None
            self._show_editing()
            if turn in self.turns:
                await self._truncate_from(turn)
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
                                                               system_prompt=self.chat_app.system_prompt)
            self.title = title
            self.save_settings()
        return self.conversation_id

    async def _mount(self, widget) -> None:
        messages = self.query_one("#messages", VerticalScroll)
        welcome = self.query("#welcome")
        if welcome:
            await welcome.remove()
        await messages.mount(widget)
        messages.scroll_end(animate=False)

    async def _start_reply(self, previous: list[dict] | None = None) -> None:
        """previous: the versions of this reply that a regenerate replaced, newest first (u brings them back)."""
        app = self.chat_app
        assert self.conversation_id is not None
        history = [{"role": t.role, "content": t.content} for t in self.turns]
        compare = self.compare_mode
        sampling = Sampling(**app.sampling.to_dict())
        meta: dict[str, Any] = {"sampling": sampling.to_dict(), "steering": self.session.steering_info(),
                                "system_prompt": app.system_prompt}
        if previous:
            meta["previous"] = previous
        if compare:
            meta["compare"] = ""
        mid = self.store.add_message(self.conversation_id, "assistant", "", status="streaming", meta=meta)
        view: MessageView | CompareView = (CompareView(mid=mid, streaming=True) if compare
                                           else MessageView("assistant", "", mid=mid, streaming=True))
        await self._mount(view)
        turn = Turn(mid, "assistant", "", view, meta, status="streaming")
        self.turns.append(turn)
        self._current = turn
        self.query_one(ExpertHeatmap).clear("generating…")
        self.query_one(TokenInspector).clear()
        self._token_texts = []
        self._stored_routes = None
        self.generating = True
        self._stop = threading.Event()
        self._saved_at = time.monotonic()
        self._saved_text = False
        self.update_status("starting…")
        self._generate(history, compare, turn, sampling, app.system_prompt)

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
        turn.meta["seed"] = u.seed
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
        routing = None
        if u.done:
            status = "stopped" if u.stopped else "done"
            turn.meta.update({"n_tokens": len(u.tokens[0]), "finish": u.finish[0], "steered_from": u.steered_from[0],
                              "n_prompt": u.n_prompt, "tokens_per_s": u.tokens_per_s, "dropped_messages": u.dropped,
                              "think_end": u.think_end[0] if u.think_end else None})
            routing = turn.routing = self.session.routing_summary(u.texts)
        try:
            self.store.update_message(turn.mid, u.texts[0], status=status, meta=turn.meta, routing=routing)
        except Exception as e:  # disk full, database locked: keep going, say so
            self.notify(f"Could not save the reply: {e}", severity="error")

    def _info(self, u: ReplyUpdate, meta: dict) -> str:
        n = len(u.tokens[0])
        parts = [f"{n} tok"]
        if u.tokens_per_s is not None and not self.chat_app.stable_stats:
            parts.append(f"{u.tokens_per_s:.1f} tok/s")
        parts.append(_steer_label(meta))
        if u.stopped:
            parts.append("stopped")
        elif u.finish and u.finish[0] == "length":
            parts.append("[b]cut at max tokens[/]")
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
        self._current = None
        self._refresh_token_routes()
        if u.stopped:
            self.notify("Stopped")

    async def _apply_failure(self, turn: Turn, error: Exception) -> None:
        self.generating = False
        self._current = None
        msg = f"Generation failed: {error}"
        self.notify(msg, severity="error", timeout=8)
        self.update_status("failed")
        turn.status = "error"
        if turn.content:  # keep what was generated
            self.store.update_message(turn.mid, turn.content, status="stopped", meta=turn.meta)
            return
        # nothing generated: take back the reply and the message it answered, and put that message back in the
        # input, so that sending again does not leave two user messages in a row
        i = self.turns.index(turn) if turn in self.turns else len(self.turns)
        user = self.turns[i - 1] if i > 0 and self.turns[i - 1].role == "user" else None
        await self._truncate_from(user or turn)
        if user is not None:
            chat_input = self.query_one(ChatInput)
            if not chat_input.text.strip():
                chat_input.load_text(user.content)
                chat_input.move_cursor(chat_input.document.end)
            chat_input.focus()

    def on_unmount(self) -> None:
        self._stop.set()
        self.interrupted()

    def interrupted(self) -> None:
        """The app is quitting mid-reply: mark the reply as stopped (its text so far is kept)."""
        turn, self._current = self._current, None
        if turn is None:
            return
        turn.meta["finish"] = "quit"
        try:
            self.store.update_message(turn.mid, turn.content, status="stopped", meta=turn.meta)
        except Exception:  # the store is closing: recover() marks it on the next start
            pass

    # -- routing views --

    def _show_routing(self, u: ReplyUpdate) -> None:
        heatmap = self.query_one(ExpertHeatmap)
        marks = self.session.steered_cells() if self.session.steering_active else {}
        n = len(u.tokens[0])
        if len(u.selections) > 1:
            heatmap.set_data(u.selections[0], u.routed[0], baseline=(u.selections[1], u.routed[1]), marks=marks,
                             title=f"steered − unsteered routing, {n} tokens")
        elif u.done and u.think_end and u.think_end[0] is not None:
            summary = self.session.routing_summary(u.texts)
            parts = _parts(summary, 0, self.session) if summary else None
            heatmap.set_data(u.selections[0], u.routed[0], marks=marks, title=f"routing of this reply, {n} tokens",
                             thinking=parts[0] if parts else None, answer=parts[1] if parts else None)
        else:
            heatmap.set_data(u.selections[0], u.routed[0], marks=marks, title=f"routing of this reply, {n} tokens")

    def _show_tokens(self, u: ReplyUpdate) -> None:
        toks = u.tokens[0]
        for t in toks[len(self._token_texts):]:
            self._token_texts.append(self.session.token_text(t))
        self._token_steered = u.steered_from[0]
        self.query_one(TokenInspector).set_tokens(self._token_texts, u.steered_from[0],
                                                  u.think_end[0] if u.think_end else None)
        self._refresh_token_routes()

    def _refresh_token_routes(self) -> None:
        """The token shown in the Tokens tab was picked while its routing was still being recorded: show it all."""
        inspector = self.query_one(TokenInspector)
        i = inspector.shown
        if i is None or i >= len(self._token_texts) or self.session.topology is None:
            return
        if inspector.routes_table.row_count < len(self.session.topology.moe_layers):
            self._show_token(i)

    def _show_token(self, i: int) -> None:
        routes: list[TokenTrace] | None
        if self._stored_routes is not None:
            raw = self._stored_routes[i] if i < len(self._stored_routes) else []
            routes = [TokenTrace(int(r[0]), 0, i, 0, np.asarray(r[1], np.int32), np.asarray(r[2], np.float32))
                      for r in raw] or None
        else:
            routes = self.session.token_routes(i)
        self.query_one(TokenInspector).show_routes(i, self._token_texts[i], routes, self.session.steered_cells(),
                                                   pending=self.generating and self._stored_routes is None)

    def on_token_inspector_selected(self, event: TokenInspector.Selected) -> None:
        if event.index < len(self._token_texts):
            self._show_token(event.index)

    def _show_stored_routing(self) -> None:
        """A resumed chat: show the routing stored with its last reply (when it was made on this model's shape);
        a damaged record is said to be so, never fatal."""
        try:
            self._show_stored_routing_unchecked()
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            self._stored_routes = None
            self._token_texts = []
            self.query_one(TokenInspector).clear()
            self.query_one(ExpertHeatmap).clear("the routing saved with the last reply could not be read")

    def _show_stored_routing_unchecked(self) -> None:
        turn = self._last("assistant")
        topo = self.session.topology
        summary = turn.routing if turn is not None else None
        if summary is None or topo is None or self.generating:
            return
        if list(summary.get("moe_layers", [])) != list(topo.moe_layers) or summary.get("n_expert") != topo.n_expert:
            self.query_one(ExpertHeatmap).clear("the last reply's routing was recorded on another model")
            return
        seqs = summary.get("seqs") or []
        if not seqs:
            return
        think, answer = _parts(summary, 0, self.session)
        total = (think[0] + answer[0], think[1] + answer[1])
        entry = seqs[0]
        heatmap = self.query_one(ExpertHeatmap)
        marks = self.session.steered_cells() if self.session.steering_active else {}
        n = len(entry.get("tokens", []))
        if len(seqs) > 1:
            bt, ba = _parts(summary, 1, self.session)
            heatmap.set_data(*total, baseline=(bt[0] + ba[0], bt[1] + ba[1]), marks=marks,
                             title=f"steered − unsteered routing, {n} tokens (saved)")
        else:
            has_think = entry.get("think_end") is not None
            heatmap.set_data(*total, marks=marks, title=f"routing of this reply, {n} tokens (saved)",
                             thinking=think if has_think else None, answer=answer if has_think else None)
        self._token_texts = [self.session.token_text(t) for t in entry.get("tokens", [])]
        self._stored_routes = entry.get("routes")
        steered = turn.meta.get("steered_from") if turn is not None else None
        inspector = self.query_one(TokenInspector)
        inspector.clear()
        inspector.set_tokens(self._token_texts, steered, entry.get("think_end"))

    def on_expert_heatmap_picked(self, event: ExpertHeatmap.Picked) -> None:
        self.show_tab("tab-steer")
        self.query_one(SteeringPanel).pick(event.layer, event.expert)

    # -- actions --

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()
        elif self.editing is not None:
            self.cancel_edit()
        elif self._overlay_open:
            self.action_toggle_panel()

    @property
    def _overlay_open(self) -> bool:
        side = self.query_one("#side")
        return side.display and side.has_class("-overlay")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":  # shown (and Esc taken) only while there is something to stop, cancel or close
            return self.generating or self.editing is not None or self._overlay_open
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
        later = len(self.turns) - self.turns.index(turn) - 1
        if later == 0:
            await self._regenerate(turn)
            return

        async def done(yes: bool | None) -> None:
            if yes and turn in self.turns and not self.generating:
                await self._regenerate(turn)

        self.app.push_screen(Confirm(f"Regenerate this reply? The {later} message{'s' if later > 1 else ''} after it "
                                     "will be deleted."), done)

    async def _regenerate(self, turn: Turn) -> None:
        self.cancel_edit(quiet=True)
        last = turn is self.turns[-1]
        previous = [_version(turn), *turn.meta.get("previous", [])][:MAX_VERSIONS] if last and turn.content else None
        await self._truncate_from(turn)
        if self.turns:
            await self._start_reply(previous)
            if previous:
                self.notify(f"Regenerating; the earlier reply is kept ({len(previous)} earlier version"
                            f"{'s' if len(previous) > 1 else ''}): u on the reply or ctrl+p → Previous reply version "
                            "brings it back")

    async def action_previous_version(self, turn: Turn | None = None) -> None:
        """Swap the last reply with the version a regenerate replaced (again: the one before, round the list)."""
        if self.generating:
            self.notify("Still generating: press Esc to stop first", severity="warning")
            return
        turn = turn or self._last("assistant")
        if turn is None or not turn.meta.get("previous"):
            self.notify("No earlier version of this reply (regenerate keeps the one it replaces)", severity="warning")
            return
        if turn is not self.turns[-1]:
            self.notify("Only the last reply has earlier versions", severity="warning")
            return
        earlier, *rest = turn.meta["previous"]
        current = _version(turn)
        meta = {k: v for k, v in turn.meta.items() if k not in _VERSION_KEYS}
        meta.update({k: v for k, v in earlier.items() if k not in ("content", "routing")})
        meta["previous"] = [*rest, current]
        turn.meta, turn.content, turn.routing = meta, earlier.get("content", ""), earlier.get("routing")
        info = _stored_info(Message(turn.mid, "assistant", turn.content, turn.status, meta))
        if isinstance(turn.view, CompareView):
            await turn.view.finish(turn.content, meta.get("compare", ""), info)
        else:
            await turn.view.finish(turn.content, info)
        self.store.update_message(turn.mid, turn.content, meta=meta, routing=turn.routing or {})
        self.query_one(ExpertHeatmap).clear()
        self.query_one(TokenInspector).clear()
        self._show_stored_routing()
        n = len(meta["previous"]) + 1
        self.notify(f"Showing an earlier version of the reply ({n} versions; u again for the next)")

    async def action_edit_last(self, turn: Turn | None = None) -> None:
        if self._busy():
            return
        turn = turn or self._last("user")
        if turn is None:
            self.notify("No message to edit yet", severity="warning")
            return
        self.editing = turn
        self._show_editing()
        chat_input = self.query_one(ChatInput)
        chat_input.load_text(turn.content)
        chat_input.move_cursor(chat_input.document.end)
        chat_input.focus()
        self.refresh_bindings()

    def _show_editing(self) -> None:
        """Dim the messages an edit will replace, and say what Enter and Esc do."""
        turn = self.editing
        i = self.turns.index(turn) if turn is not None and turn in self.turns else len(self.turns)
        for k, t in enumerate(self.turns):
            t.view.set_class(k >= i, "-replaced")
        banner = self.query_one("#edit-banner", Static)
        n = len(self.turns) - i
        banner.update(f"Editing: [b]Enter[/] sends and replaces the dimmed {n} message{'s' if n != 1 else ''}; "
                      "[b]Esc[/] cancels (nothing is deleted)" if turn is not None else "")
        banner.set_class(turn is not None, "-visible")

    def cancel_edit(self, quiet: bool = False) -> None:
        if self.editing is None:
            return
        self.editing = None
        self._show_editing()
        self.query_one(ChatInput).clear()
        self.refresh_bindings()
        if not quiet:
            self.notify("Edit cancelled: the conversation is unchanged")

    async def on_message_view_action(self, event: MessageView.Action) -> None:
        view = event.view
        parent = next((a for a in view.ancestors if isinstance(a, CompareView)), None)
        target = parent or view
        turn = next((t for t in self.turns if t.view is target), None)
        if turn is None:
            return
        if event.action == "edit" and turn.role == "user":
            await self.action_edit_last(turn)
        elif event.action == "regenerate" and turn.role == "assistant":
            await self.action_regenerate(turn)
        elif event.action == "previous_version" and turn.role == "assistant":
            await self.action_previous_version(turn)

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
        self.save_settings()
        self.notify(f"Steering {'on' if s.steering_enabled else 'off'} (from the next reply)")

    def action_compare(self) -> None:
        self.compare_mode = not self.compare_mode
        if self.compare_mode and not self.session.steering_active:
            self.notify("Compare mode on, but no steering is active: both sides will match", severity="warning")
        else:
            self.notify(f"Compare mode {'on: steered and unsteered side by side' if self.compare_mode else 'off'}")
        self.update_status()
        self.save_settings()

    def action_next_tab(self) -> None:
        """F2: open the side panel on its first tab, then move to the next one (focus goes into it)."""
        side = self.query_one("#side", TabbedContent)
        tabs = ["tab-steer", "tab-experts", "tab-tokens"]
        if not side.display:
            tab = side.active or tabs[0]
        else:
            tab = tabs[(tabs.index(side.active) + 1) % len(tabs)] if side.active in tabs else tabs[0]
        self.action_show_tab(tab)

    def action_show_tab(self, tab: str) -> None:
        self.show_tab(tab)
        target = {"tab-steer": "#steer-enabled", "tab-experts": "#heatmap", "tab-tokens": "#token-list"}.get(tab)
        if target:
            self.query_one(target).focus()

    def show_tab(self, tab: str) -> None:
        """Show a side panel tab (tab-steer, tab-experts, tab-tokens)."""
        side = self.query_one("#side", TabbedContent)
        self.panel_open = True
        side.display = True
        focused = self.focused
        if focused is not None and side in focused.ancestors:
            self.query_one(ChatInput).focus()  # the panel follows focus: move it out of the old tab first
        side.active = tab

    def action_toggle_panel(self) -> None:
        side = self.query_one("#side")
        self.panel_open = not side.display
        side.display = self.panel_open
        if not self.panel_open:
            focused = self.focused
            if focused is None or side in focused.ancestors:
                self.query_one(ChatInput).focus()

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
        app = self.chat_app
        conv = self.store.conversation(self.conversation_id) if self.conversation_id is not None else None

        def done(result) -> None:
            if result is None:
                return
            system_prompt, sampling = result
            app.set_settings(system_prompt, sampling)
            if self.conversation_id is not None:
                self.store.set_system_prompt(self.conversation_id, system_prompt)
            self.save_settings()
            self.update_status()
            self.notify("Settings saved with this conversation (from the next reply)")

        n_ctx = self.session.n_ctx_actual
        app.push_screen(SettingsScreen(app.system_prompt, app.sampling, n_ctx=n_ctx,
                                       conversation=conv.title if conv else None), done)

    async def load_conversation(self, cid: int | None) -> None:
        """Show a stored conversation (None: a new, empty one) and restore its settings."""
        self.cancel_edit(quiet=True)
        messages = self.query_one("#messages", VerticalScroll)
        for t in self.turns:
            await t.view.remove()
        self.turns = []
        await messages.query("#welcome").remove()
        self.conversation_id = cid
        self.query_one(ExpertHeatmap).clear()
        self.query_one(TokenInspector).clear()
        self._stored_routes = None
        self._token_texts = []
        self._last_stats = ""
        if cid is None:  # a new conversation starts with the current settings
            self.title = "moe-gguf chat"
            await messages.mount(Static(self._welcome(), id="welcome"))
            self.update_status()
            return
        conv = self.store.conversation(cid)
        self.title = conv.title if conv else "conversation"
        stored = self.store.messages(cid)
        for m in stored:
            view: MessageView | CompareView
            if m.role == "assistant" and "compare" in m.meta:
                view = CompareView(m.content, m.meta["compare"], mid=m.id, info=_stored_info(m))
            else:
                view = MessageView(m.role, m.content, mid=m.id, info=_stored_info(m) if m.role == "assistant" else "")
            await messages.mount(view)
            self.turns.append(Turn(m.id, m.role, m.content, view, m.meta, m.status, m.routing))
        messages.scroll_end(animate=False)
        settings = self.store.settings(cid) or _settings_from_messages(stored, conv.system_prompt if conv else "")
        self._restore(settings, conv.system_prompt if conv else "")
        self.update_status()

    def _restore(self, settings: dict[str, Any], system_prompt: str) -> None:
        """Apply a conversation's settings; say what could not be restored."""
        app = self.chat_app
        problems: list[str] = []
        if not isinstance(settings, dict):
            settings, problems = {}, ["its saved settings could not be read"]
        saved_prompt = settings.get("system_prompt")
        app.system_prompt = saved_prompt if isinstance(saved_prompt, str) and saved_prompt else system_prompt
        if isinstance(settings.get("sampling"), dict):
            try:
                app.sampling = Sampling.from_dict(settings["sampling"])
            except ValueError as e:
                problems.append(f"its sampling settings could not be restored ({e})")
        self.compare_mode = bool(settings.get("compare", False))
        model_path = settings.get("model_path")
        model_path = model_path if isinstance(model_path, str) else None
        steering = settings.get("steering") or {}
        if not isinstance(steering, dict):
            steering, problems = {}, [*problems, "its saved steering could not be read"]
        current = self.session.model_path
        if model_path and (current is None or Path(model_path).resolve() != current.resolve()):
            if Path(model_path).exists():
                self._after_load = problems
                app.load_model(Path(model_path), then=lambda: self._restored(steering))
                self.notify(f"Loading this conversation's model, {Path(model_path).name}", title="Resume")
                return
            problems.append(f"its model {model_path} is not there any more; it continues on {self.session.model_name}")
        self._after_load = problems
        self._restored(steering)

    def _restored(self, steering: dict[str, Any]) -> None:
        problems, self._after_load = self._after_load, []
        if steering:
            problems += self.session.restore_steering(steering)
        self.query_one(SteeringPanel).forget_choices()
        self.refresh_steering()
        self._show_stored_routing()
        self.chat_app.show_profile_warnings()
        if problems:
            self.notify("Resumed, but " + "; ".join(problems), title="Resume", severity="warning", timeout=12)
        else:
            s = self.session
            steer = (f"steered by {s.profile.name or 'a profile'} ×{s.strength:g}" if s.steering_active
                     else "steering off" if not s.steering_enabled else "no steering")
            self.notify(f"Resumed with its settings: {steer}{', compare mode' if self.compare_mode else ''}",
                        title="Resume")

    # -- steering panel --

    def refresh_steering(self, error: str = "") -> None:
        s = self.session
        self.query_one(SteeringPanel).show(s.profile, enabled=s.steering_enabled, strength=s.strength,
                                           path=s.profile_path.name if s.profile_path else None, error=error,
                                           allow_mismatch=s.allow_mismatch)
        self.query_one(ExpertHeatmap).set_marks(s.steered_cells() if s.steering_active else {})
        self.update_status()

    def _steer(self, change) -> None:
        """Carry out a steering change from the panel; a bad one is shown and changes nothing."""
        try:
            change()
        except (ProfileError, ValueError, IndexError) as e:
            self.refresh_steering(error=str(e))
            self.notify(str(e), severity="error", timeout=8)
            return
        self.refresh_steering()
        self.save_settings()

    def on_steering_panel_profile_command(self, event: SteeringPanel.ProfileCommand) -> None:
        event.stop()
        if event.command == "load":
            self.pick_profile()
        elif event.command == "save":
            self.save_profile_dialog()
        else:
            self._steer(self.session.new_profile)

    def on_steering_panel_steering_toggled(self, event: SteeringPanel.SteeringToggled) -> None:
        event.stop()
        self._steer(lambda: setattr(self.session, "steering_enabled", event.enabled))

    def on_steering_panel_allow_mismatch_toggled(self, event: SteeringPanel.AllowMismatchToggled) -> None:
        event.stop()
        self._steer(lambda: setattr(self.session, "allow_mismatch", event.allow))
        if event.allow:
            self.notify("Profiles made for another model are now applied when every entry fits this one "
                        "(load the profile again)", title="Allow other model")

    def on_steering_panel_strength_changed(self, event: SteeringPanel.StrengthChanged) -> None:
        event.stop()
        self._steer(lambda: self.session.set_strength(event.strength))

    def on_steering_panel_schedule_changed(self, event: SteeringPanel.ScheduleChanged) -> None:
        event.stop()
        sc = event.schedule
        self._steer(lambda: self.session.set_schedule(sc.apply_to, sc.after_tokens, sc.after_text))

    def on_steering_panel_entry_added(self, event: SteeringPanel.EntryAdded) -> None:
        event.stop()
        self._steer(lambda: self.session.add_entry(event.layer, event.expert, event.action, event.value))

    def on_steering_panel_entry_removed(self, event: SteeringPanel.EntryRemoved) -> None:
        event.stop()
        self._steer(lambda: self.session.remove_entry(event.index))

    def pick_profile(self) -> None:
        start = self.session.profile_path.parent if self.session.profile_path else Path.cwd()

        def done(path: Path | None) -> None:
            if path is not None:
                self.chat_app.load_profile(path)

        self.app.push_screen(FilePicker("Load a steering profile (.json)", start=start, suffixes=(".json",)), done)

    def save_profile_dialog(self) -> None:
        s = self.session
        start = s.profile_path.parent if s.profile_path else Path.cwd()
        name = _free_name(start, s.profile.name or "profile")

        def save(path: Path) -> None:
            try:
                saved = s.save_profile(path)
            except ProfileError as e:
                self.notify(str(e), severity="error", timeout=8)
                return
            self.refresh_steering()
            self.save_settings()
            self.notify(f"Saved the profile to {saved}")

        def done(path: Path | None) -> None:
            if path is None:
                return
            target = path.expanduser()
            if target.suffix != ".json":
                target = target.with_name(target.name + ".json")
            if not target.exists():
                save(target)
                return

            def confirmed(yes: bool | None) -> None:
                if yes:
                    save(target)
                else:
                    self.notify("Not saved: the file is unchanged")

            self.app.push_screen(Confirm(f"{target} exists. Overwrite it?"), confirmed)

        self.app.push_screen(FilePicker("Save the steering profile (a new file name)", start=start,
                                        suffixes=(".json",), save=True, default_name=name), done)


MAX_VERSIONS = 10  # earlier versions of a regenerated reply kept with it
# what a version of a reply holds (besides its text and routing)
_VERSION_KEYS = ("sampling", "steering", "seed", "n_tokens", "finish", "steered_from", "n_prompt", "tokens_per_s",
                 "dropped_messages", "think_end", "compare")


def _version(turn: Turn) -> dict[str, Any]:
    """A reply's text, routing and what produced it, to keep when a regenerate replaces it."""
    out = {k: turn.meta[k] for k in _VERSION_KEYS if k in turn.meta}
    out["content"] = turn.content
    if turn.routing:
        out["routing"] = turn.routing
    return out


def _free_name(directory: Path, stem: str) -> str:
    """`stem`.json, or stem-2.json, stem-3.json, ... : a file name not taken in `directory`."""
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-.") or "profile"
    name, n = f"{stem}.json", 2
    while (directory / name).exists():
        name, n = f"{stem}-{n}.json", n + 1
    return name


def _parts(summary: dict, seq: int, session: ChatSession) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                    tuple[np.ndarray, np.ndarray]]:
    """(thinking, answer) selection counts and tokens routed of a stored routing summary, as full-size arrays."""
    topo = session.topology
    assert topo is not None
    layers = summary["moe_layers"]
    entry = summary["seqs"][seq]
    out = []
    for part in ("think", "answer"):
        sel = np.zeros((topo.n_layer, topo.n_expert), np.int64)
        routed = np.zeros(topo.n_layer, np.int64)
        sel[layers] = np.asarray(entry[part]["sel"], np.int64).reshape(len(layers), topo.n_expert)
        routed[layers] = np.asarray(entry[part]["routed"], np.int64)
        out.append((sel, routed))
    return out[0], out[1]


def _settings_from_messages(messages: list[Message], system_prompt: str) -> dict[str, Any]:
    """Settings of a conversation stored before conversations kept their own: those of its last reply."""
    last = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if last is None:
        return {}
    out: dict[str, Any] = {"system_prompt": last.meta.get("system_prompt", system_prompt),
                           "compare": "compare" in last.meta}
    if isinstance(last.meta.get("sampling"), dict):
        out["sampling"] = last.meta["sampling"]
    if isinstance(last.meta.get("steering"), dict):
        steer = dict(last.meta["steering"])
        if not steer.get("profile"):  # an unsteered reply: steering off, nothing loaded
            steer["enabled"] = False
        out["steering"] = steer
    return out


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
        parts.append("stopped (the app was closed)" if m.meta.get("finish") in (None, "quit") else "stopped")
    elif m.meta.get("finish") == "length":
        parts.append("[b]cut at max tokens[/]")
    return " · ".join(parts)
