"""Per-token routing: the generated tokens of the current reply; select one to see its experts in each layer."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from moe_gguf.formats.records import TokenTrace


class TokenInspector(Vertical):
    class Selected(Message):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def compose(self) -> ComposeResult:
        yield Static("Generated tokens (select one):", classes="panel-label")
        table = DataTable(id="token-list", cursor_type="row", zebra_stripes=True)
        table.add_columns("#", "token", "steered", "part")
        yield table
        yield Static("", id="token-title", classes="panel-label")
        routes = DataTable(id="token-routes", cursor_type="row", show_cursor=False)
        routes.add_columns("layer", "experts (routing weight)")
        yield routes

    @property
    def token_list(self) -> DataTable:
        return self.query_one("#token-list", DataTable)

    @property
    def routes_table(self) -> DataTable:
        return self.query_one("#token-routes", DataTable)

    def clear(self) -> None:
        self.shown = None
        self.think_end = None
        self.token_list.clear()
        self.routes_table.clear()
        self.query_one("#token-title", Static).update("")

    def set_tokens(self, texts: list[str], steered_from: int | None, think_end: int | None = None) -> None:
        """All generated tokens so far (rows are only appended while a reply streams). think_end: the number of
        tokens up to and including </think> (a reasoning model's thinking), None if it has none (yet)."""
        table = self.token_list
        if table.row_count > len(texts) or think_end != self.think_end:
            table.clear()
        self.think_end = think_end
        for i in range(table.row_count, len(texts)):
            steered = "yes" if steered_from is not None and i >= steered_from else ""
            part = "" if think_end is None else "think" if i < think_end else "answer"
            table.add_row(str(i), repr(texts[i])[1:-1][:24], steered, part, key=str(i))

    think_end: int | None = None
    shown: int | None = None  # the token whose routes are shown
    shown_complete = False

    def show_routes(self, index: int, text: str, routes: list[TokenTrace] | None,
                    marks: dict[tuple[int, int], str], pending: bool = False) -> None:
        """pending: the reply is still being generated (a token's routing is recorded when it is fed back)."""
        title = self.query_one("#token-title", Static)
        table = self.routes_table
        table.clear()
        self.shown = index
        if routes is None:
            why = "routing not recorded yet" if pending else "not decoded (the last token of a reply cut by max tokens)"
            title.update(f"token {index} {text!r}: {why}")
            return
        title.update(f"token {index} {text!r}: experts per layer")
        for t in routes:
            order = sorted(range(len(t.experts)), key=lambda k: -float(t.weights[k]))
            cells = []
            for k in order:
                e = int(t.experts[k])
                mark = {"disable": "✕", "force": "▲", "bias": "±", "scale": "*"}.get(marks.get((t.layer, e), ""), "")
                cells.append(f"{e}{mark} ({float(t.weights[k]):.2f})")
            table.add_row(f"L{t.layer}", "  ".join(cells))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "token-list" and event.row_key is not None and event.row_key.value is not None:
            event.stop()
            self.post_message(self.Selected(int(event.row_key.value)))
