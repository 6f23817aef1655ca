"""Layer × expert heatmap of routing: how often each expert was selected for the tokens of the current reply."""

from __future__ import annotations

import numpy as np
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widget import Widget

MARKS = {"disable": "✕", "force": "▲", "bias": "±", "scale": "*"}
_LABEL_W = 5  # "L12 "


def _heat(f: float) -> str:
    """0..1 -> colour from dark blue through orange to yellow."""
    f = min(max(f, 0.0), 1.0)
    stops = [(0.0, (24, 26, 38)), (0.25, (46, 82, 160)), (0.5, (160, 70, 150)), (0.75, (235, 120, 40)), (1.0, (250, 230, 90))]
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):
        if f <= b:
            t = (f - a) / (b - a)
            r, g, bl = (round(x + (y - x) * t) for x, y in zip(ca, cb, strict=True))
            return f"rgb({r},{g},{bl})"
    return "rgb(250,230,90)"


def _diff(d: float) -> str:
    """-1..1 -> blue (less than unsteered) .. neutral .. red (more)."""
    d = min(max(d, -1.0), 1.0)
    base = (30, 30, 40)
    target = (230, 70, 60) if d > 0 else (60, 120, 235)
    r, g, b = (round(x + (y - x) * abs(d)) for x, y in zip(base, target, strict=True))
    return f"rgb({r},{g},{b})"


VIEWS = ("all", "thinking", "answer")


class ExpertHeatmap(Widget, can_focus=True):
    """Rows are MoE layers, columns experts; colour = fraction of tokens that selected the expert.

    Steered experts are marked (✕ disabled, ▲ forced, ± bias, * scale). Click a cell, or move the cursor with the
    arrow keys and press Enter, to pick that expert. A reasoning model's reply can be shown whole, or its
    thinking or answer tokens only (v).
    """

    DEFAULT_CSS = "ExpertHeatmap { height: auto; } ExpertHeatmap:focus { background: $boost; }"
    BINDINGS = [
        Binding("up", "move(-1, 0)", "Up", show=False),
        Binding("down", "move(1, 0)", "Down", show=False),
        Binding("left", "move(0, -1)", "Left", show=False),
        Binding("right", "move(0, 1)", "Right", show=False),
        Binding("enter,space", "pick", "Pick expert"),
        Binding("v", "cycle_view", "All / thinking / answer"),
    ]

    class Picked(Message):
        def __init__(self, layer: int, expert: int) -> None:
            super().__init__()
            self.layer, self.expert = layer, expert

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.moe_layers: tuple[int, ...] = ()
        self.n_expert = 0
        self.freq: np.ndarray | None = None
        self.base: np.ndarray | None = None  # unsteered frequencies (compare mode): show the difference
        self.routed: np.ndarray | None = None
        self.marks: dict[tuple[int, int], str] = {}
        self.title = "no reply yet"
        self.cursor = (0, 0)  # (row of moe_layers, expert)
        self.view = "all"
        # thinking / answer parts of the reply: view -> (selections, routed); "all" is what set_data gave
        self.parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._baseline: tuple[np.ndarray, np.ndarray] | None = None

    def set_shape(self, layers: tuple[int, ...], n_expert: int) -> None:
        self.moe_layers, self.n_expert = tuple(layers), n_expert
        self.freq = self.base = self.routed = None
        self.parts = {}
        self.cursor = (0, 0)
        self.refresh(layout=True)

    def set_data(self, selections: np.ndarray, routed: np.ndarray, *, baseline: tuple[np.ndarray, np.ndarray] | None = None,
                 marks: dict[tuple[int, int], str] | None = None, title: str = "",
                 thinking: tuple[np.ndarray, np.ndarray] | None = None,
                 answer: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """selections [n_layer, n_expert], routed [n_layer]; thinking / answer: the same for those tokens only."""
        self.parts = {"all": (selections, routed)}
        if thinking is not None and answer is not None and int(np.max(thinking[1], initial=0)) > 0:
            self.parts.update(thinking=thinking, answer=answer)
        elif self.view != "all":
            self.view = "all"
        self._baseline = baseline
        if marks is not None:
            self.marks = marks
        self.title = title
        self._show()

    def _show(self) -> None:
        selections, routed = self.parts.get(self.view) or self.parts["all"]
        self.routed = routed
        self.freq = selections / np.maximum(routed, 1)[:, None]
        b = self._baseline
        self.base = None if b is None or self.view != "all" else b[0] / np.maximum(b[1], 1)[:, None]
        self.refresh(layout=True)

    def action_cycle_view(self) -> None:
        if len(self.parts) < 3:
            self.notify("This reply has no thinking part: only the whole reply is shown", severity="warning")
            return
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self._show()

    def action_move(self, dr: int, dc: int) -> None:
        if not self.moe_layers or not self.n_expert:
            return
        r, c = self.cursor
        self.cursor = (min(max(r + dr, 0), len(self.moe_layers) - 1), min(max(c + dc, 0), self.n_expert - 1))
        self.refresh()

    def action_pick(self) -> None:
        if self.moe_layers and self.n_expert:
            r, c = self.cursor
            self.post_message(self.Picked(self.moe_layers[r], c))

    def set_marks(self, marks: dict[tuple[int, int], str]) -> None:
        self.marks = marks
        self.refresh()

    def clear(self, title: str = "no reply yet") -> None:
        self.freq = self.base = self.routed = None
        self.parts = {}
        self.title = title
        self.refresh(layout=True)

    @property
    def cell_width(self) -> int:
        if not self.n_expert:
            return 1
        return int(min(4, max(1, (self.size.width - _LABEL_W - 8) // self.n_expert)))

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.moe_layers) + 6

    def render(self) -> Text:
        out = Text(no_wrap=True, overflow="crop")
        if not self.moe_layers:
            return Text("load a model to see its experts", style="dim")
        w = self.cell_width
        view = {"all": "", "thinking": " · thinking tokens", "answer": " · answer tokens"}[self.view]
        out.append(f"{self.title}{view}\n", style="bold")
        head = " " * _LABEL_W
        for e in range(self.n_expert):
            if w >= 2:
                head += f"{e:>{w}}"[-w:]
            else:
                head += str(e // 10 % 10) if e % 10 == 0 else " "
        out.append(head + "\n", style="dim")
        focused = self.has_focus
        for row, il in enumerate(self.moe_layers):
            out.append(f"L{il:<3} ", style="dim")
            for e in range(self.n_expert):
                mark = self.marks.get((il, e))
                if self.freq is None:
                    bg = _heat(0.0)
                elif self.base is not None:
                    bg = _diff(float(self.freq[il, e] - self.base[il, e]))
                else:
                    bg = _heat(float(self.freq[il, e]))
                cell = (MARKS[mark] if mark else "").center(w)[:w] if w > 1 else (MARKS[mark] if mark else " ")
                here = focused and self.cursor == (row, e)
                if here and not mark:
                    cell = "[]".center(w)[:w] if w > 1 else "□"
                out.append(cell, style=Style(bgcolor=bg, color="white", bold=True, reverse=here))
            if self.routed is not None:
                suffix = f" {int(self.routed[il])} tok"
                if _LABEL_W + self.n_expert * w + len(suffix) <= self.size.width:  # never wrap a row
                    out.append(suffix, style="dim")
            out.append("\n")
        if self.base is not None:
            out.append("red: chosen more than unsteered, blue: less", style="dim")
        else:
            out.append("dark: never chosen … yellow: every token", style="dim")
        out.append("\n✕ disabled ▲ forced ± bias * scale", style="dim")
        if len(self.parts) >= 3:
            out.append("\nv: whole reply / thinking / answer tokens", style="dim")
        if focused:
            out.append("\narrows move, enter picks the expert", style="dim")
        return out

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def on_click(self, event: events.Click) -> None:
        row = event.y - 2
        col = event.x - _LABEL_W
        if 0 <= row < len(self.moe_layers) and 0 <= col < self.n_expert * self.cell_width:
            self.cursor = (row, col // self.cell_width)
            self.post_message(self.Picked(self.moe_layers[row], col // self.cell_width))
