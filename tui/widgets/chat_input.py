"""The message input: Enter sends, ctrl+j / shift+enter insert a newline, up/down walk the prompt history."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class ChatInput(TextArea):
    BINDINGS = [
        Binding("enter", "submit", "Send", id="send"),
        Binding("ctrl+j,shift+enter", "newline", "Newline", id="newline", show=False),
    ]

    class Submitted(Message):
        def __init__(self, chat_input: ChatInput, text: str) -> None:
            super().__init__()
            self.chat_input = chat_input
            self.text = text

    def __init__(self, *, history: list[str] | None = None, send_keys: list[str] | None = None,
                 newline_keys: list[str] | None = None, **kw) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", compact=True, **kw)
        self.prompt_history: list[str] = list(history or [])
        self._hist_pos: int | None = None  # index into history while browsing
        self._draft = ""
        self.send_keys = send_keys or ["enter"]
        self.newline_keys = newline_keys or ["ctrl+j", "shift+enter"]

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        if key in self.send_keys:
            event.stop()
            event.prevent_default()
            self.action_submit()
            return
        if key in self.newline_keys:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        if key == "up" and self.cursor_location[0] == 0 and self._history_step(-1):
            event.stop()
            event.prevent_default()
            return
        if key == "down" and self.cursor_location[0] == self.document.line_count - 1 and self._history_step(1):
            event.stop()
            event.prevent_default()
            return
        await super()._on_key(event)

    def action_submit(self) -> None:
        text = self.text
        if text.strip():
            self.post_message(self.Submitted(self, text))

    def action_newline(self) -> None:
        start, end = self.selection
        self.replace("\n", start, end)

    def remember(self, text: str) -> None:
        """Add a sent prompt to the history and leave history browsing."""
        if text.strip() and (not self.prompt_history or self.prompt_history[-1] != text):
            self.prompt_history.append(text)
        self._hist_pos = None

    def _history_step(self, step: int) -> bool:
        if not self.prompt_history:
            return False
        if self._hist_pos is None:
            if step > 0:
                return False
            self._draft = self.text
            pos = len(self.prompt_history) - 1
        else:
            pos = self._hist_pos + step
        if pos >= len(self.prompt_history):
            self._hist_pos = None
            self.load_text(self._draft)
            self.move_cursor(self.document.end)
            return True
        if pos < 0:
            return True  # at the oldest entry: stay
        self._hist_pos = pos
        self.load_text(self.prompt_history[pos])
        self.move_cursor((0, 0) if step < 0 else self.document.end)
        return True
