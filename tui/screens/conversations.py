"""Saved conversations: resume, rename, delete, export (Markdown / JSON)."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, Static

from moe_gguf.tui.screens.dialogs import Confirm, TextPrompt
from moe_gguf.tui.store import ConversationStore


class ConversationsChanged(Message):
    """A conversation was renamed or deleted (the chat screen refreshes its title or clears itself)."""

    def __init__(self, deleted: int | None = None) -> None:
        super().__init__()
        self.deleted = deleted


class ConversationsScreen(ModalScreen[int | None]):
    """Dismisses with the id of the conversation to resume, or None."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("enter", "open", "Resume", priority=True),
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
        Binding("m", "export('md')", "Export .md"),
        Binding("j", "export('json')", "Export .json"),
    ]

    def __init__(self, store: ConversationStore, *, current: int | None = None) -> None:
        super().__init__()
        self.store = store
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="conversations-dialog"):
            yield Label("Conversations", classes="dialog-title")
            table = DataTable(id="conversations", cursor_type="row", zebra_stripes=True)
            table.add_columns("title", "messages", "updated", "model")
            yield table
            yield Static("enter resume · r rename · d delete · m / j export .md / .json · esc close",
                         classes="dialog-help", id="conversations-help")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Resume", variant="primary", id="conv-open", compact=True)
                yield Button("Rename", id="conv-rename", compact=True)
                yield Button("Delete", variant="error", id="conv-delete", compact=True)
                yield Button("Export .md", id="conv-md", compact=True, tooltip="export as Markdown (m)")
                yield Button("Export .json", id="conv-json", compact=True, tooltip="export as JSON (j)")
                yield Button("Close", id="conv-close", compact=True)

    def on_mount(self) -> None:
        self.reload()
        self.query_one(DataTable).focus()

    def reload(self) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for c in self.store.conversations():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
            mark = "● " if c.id == self.current else ""
            table.add_row(mark + c.title[:48], str(c.n_messages), when, c.model[:24], key=str(c.id))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    def _selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            self.notify("No conversations yet", severity="warning")
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return int(key.value)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = {"conv-open": "open", "conv-rename": "rename", "conv-delete": "delete", "conv-md": "export('md')",
                  "conv-json": "export('json')", "conv-close": "close"}[event.button.id or "conv-close"]
        self.run_action(action)

    def action_open(self) -> None:
        cid = self._selected()
        if cid is not None:
            self.dismiss(cid)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_rename(self) -> None:
        cid = self._selected()
        if cid is None:
            return
        conv = self.store.conversation(cid)

        def done(title: str | None) -> None:
            if title and title.strip():
                self.store.rename(cid, title.strip())
                self.reload()
                self.app.post_message(ConversationsChanged())

        self.app.push_screen(TextPrompt("Rename conversation", conv.title if conv else ""), done)

    def action_delete(self) -> None:
        cid = self._selected()
        if cid is None:
            return
        conv = self.store.conversation(cid)

        def done(yes: bool | None) -> None:
            if yes:
                self.store.delete(cid)
                self.reload()
                self.notify(f"Deleted {conv.title if conv else cid!r}")
                self.app.post_message(ConversationsChanged(deleted=cid))

        self.app.push_screen(Confirm(f"Delete the conversation {conv.title if conv else cid!r}?"), done)

    def action_export(self, fmt: str) -> None:
        cid = self._selected()
        if cid is not None:
            self.app.export_conversation(cid, fmt)  # type: ignore[attr-defined]
