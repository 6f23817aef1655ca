"""Steering panel: the working profile (load / save / new), steering on/off, strength, schedule,
the list of steered experts and a form to add one. It shows state and posts requests; the chat screen
carries them out through the session and calls ``show`` with the result."""

from __future__ import annotations

from typing import Literal

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Label, Select, Static, Switch

from moe_gguf.formats.profile import ACTIONS, Schedule, SteeringProfile

THINK_END = "</think>"


class SteeringPanel(Vertical):
    """Posts one typed message per request; the chat screen carries it out and calls ``show``."""

    class ProfileCommand(Message):
        """Load…, Save… or New pressed."""

        def __init__(self, command: Literal["load", "save", "new"]) -> None:
            super().__init__()
            self.command = command

    class SteeringToggled(Message):
        def __init__(self, enabled: bool) -> None:
            super().__init__()
            self.enabled = enabled

    class AllowMismatchToggled(Message):
        """Apply profiles made for another model when their entries fit this one."""

        def __init__(self, allow: bool) -> None:
            super().__init__()
            self.allow = allow

    class StrengthChanged(Message):
        def __init__(self, strength: float) -> None:
            super().__init__()
            self.strength = strength

    class ScheduleChanged(Message):
        def __init__(self, schedule: Schedule) -> None:
            super().__init__()
            self.schedule = schedule

    class EntryAdded(Message):
        def __init__(self, layer: int, expert: int, action: str, value: float | None) -> None:
            super().__init__()
            self.layer, self.expert, self.action, self.value = layer, expert, action, value

    class EntryRemoved(Message):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def compose(self) -> ComposeResult:
        yield Static("", id="profile-name", classes="panel-label")
        with Horizontal(classes="panel-row"):
            yield Button("Load…", id="profile-load", compact=True)
            yield Button("Save…", id="profile-save", compact=True)
            yield Button("New", id="profile-new", compact=True)
        with Horizontal(classes="panel-row"):
            yield Label("Steering", classes="field-label")
            yield Switch(value=True, id="steer-enabled")
            yield Label("×", classes="field-label")
            yield Button("-", id="strength-down", compact=True)
            yield Input("1.0", id="strength", type="number", compact=True, tooltip="strength")
            yield Button("+", id="strength-up", compact=True)
        with Horizontal(classes="panel-row"):
            yield Label("allow other model", classes="field-label")
            yield Switch(value=False, id="allow-mismatch",
                         tooltip="apply a profile made for another model when every entry fits this one")
        with Horizontal(classes="panel-row"):
            yield Label("steer", classes="field-label")
            yield Select([("prompt + reply", "all"), ("reply only", "generated")], value="all", allow_blank=False,
                         id="sched-apply", compact=True)
        with Horizontal(classes="panel-row"):
            yield Label("start", classes="field-label")
            yield Select([("at once", "start"), ("after thinking", "think"), ("after a text", "text")],
                         value="start", allow_blank=False, id="sched-when", compact=True,
                         tooltip="after thinking: once the reply has closed its </think> block")
            yield Label("+", classes="field-label")
            yield Input("0", id="sched-tokens", type="integer", compact=True, tooltip="and after N generated tokens")
            yield Label("tok", classes="field-label")
        with Horizontal(classes="panel-row", id="sched-text-row"):
            yield Label("text", classes="field-label")
            yield Input("", id="sched-text", placeholder="steer once the reply contains this", compact=True)
        yield ExpertTable(id="steer-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(classes="panel-row"):
            yield Input("", id="add-layer", placeholder="layer", type="integer", compact=True)
            yield Input("", id="add-expert", placeholder="expert", type="integer", compact=True)
        with Horizontal(classes="panel-row"):
            yield Select([(a, a) for a in ACTIONS], value="disable", allow_blank=False, id="add-action", compact=True)
            yield Input("", id="add-value", placeholder="value", type="number", compact=True)
        with Horizontal(classes="panel-row"):
            yield Button("Add", id="add-entry", variant="primary", compact=True)
            yield Button("Remove", id="remove-entry", variant="error", compact=True)
        yield Static("", id="steer-error", classes="panel-error")

    def on_mount(self) -> None:
        table = self.query_one(ExpertTable)
        table.add_columns("layer", "expert", "action", "value")

    # -- showing state --

    def show(self, profile: SteeringProfile, *, enabled: bool, strength: float, path: str | None = None,
             error: str = "", allow_mismatch: bool = False) -> None:
        with self.prevent(Input.Changed, Switch.Changed, Select.Changed):
            self.query_one("#allow-mismatch", Switch).value = allow_mismatch
            name = profile.name or "untitled"
            where = f" [dim]{path}[/]" if path else ""
            self.query_one("#profile-name", Static).update(f"Profile [b]{name}[/b] ({len(profile.entries)} entries){where}")
            self.query_one("#steer-enabled", Switch).value = enabled
            strength_input = self.query_one("#strength", Input)
            if _num(strength_input.value) != strength:
                strength_input.value = f"{strength:g}"
            sc = profile.schedule
            self.query_one("#sched-apply", Select).value = sc.apply_to
            tokens_input = self.query_one("#sched-tokens", Input)
            if _int(tokens_input.value) != sc.after_tokens:
                tokens_input.value = str(sc.after_tokens)
            when = "think" if sc.after_text == THINK_END else "text" if sc.after_text else "start"
            when_select = self.query_one("#sched-when", Select)
            if not (self._text_chosen and when == "start"):  # "after a text" picked, no text typed yet: keep it
                when_select.value = when
            self.query_one("#sched-text-row").display = when_select.value == "text"
            text_input = self.query_one("#sched-text", Input)
            if when == "text" and (text_input.value or None) != sc.after_text:
                text_input.value = sc.after_text or ""
            table = self.query_one(ExpertTable)
            row = table.cursor_row
            table.clear()
            for i, (layer, expert, action, value) in enumerate(
                    (e.layer, e.expert, e.action, e.value) for e in profile.entries):
                eff = "" if value is None else f"{value:g}"
                if value is not None and strength != 1.0:
                    eff += f" → {value * strength if action == 'bias' else value ** strength:.3g}"
                table.add_row(str(layer), str(expert), action, eff, key=str(i))
            if table.row_count:
                table.move_cursor(row=min(row, table.row_count - 1))
        self.show_error(error)

    def show_error(self, error: str) -> None:
        box = self.query_one("#steer-error", Static)
        box.update(error)
        box.set_class(bool(error), "-visible")

    def pick(self, layer: int, expert: int) -> None:
        """Prefill the add form (e.g. from a heatmap click)."""
        self.query_one("#add-layer", Input).value = str(layer)
        self.query_one("#add-expert", Input).value = str(expert)
        self.query_one("#add-action", Select).focus()

    # -- events -> requests --

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        bid = event.button.id
        if bid == "profile-load":
            self.post_message(self.ProfileCommand("load"))
        elif bid == "profile-save":
            self.post_message(self.ProfileCommand("save"))
        elif bid == "profile-new":
            self.post_message(self.ProfileCommand("new"))
        elif bid in ("strength-down", "strength-up"):
            s = _num(self.query_one("#strength", Input).value)
            s = 1.0 if s is None else s
            s = round(s + (0.25 if bid == "strength-up" else -0.25), 4)
            self.query_one("#strength", Input).value = f"{s:g}"  # -> Input.Changed -> StrengthChanged
        elif bid == "add-entry":
            self._request_add()
        elif bid == "remove-entry":
            self._request_remove()

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        if event.switch.id == "allow-mismatch":
            self.post_message(self.AllowMismatchToggled(event.value))
        else:
            self.post_message(self.SteeringToggled(event.value))

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "strength":
            event.stop()
            s = _num(event.value)
            if s is not None:
                self.post_message(self.StrengthChanged(s))
        elif event.input.id in ("sched-tokens", "sched-text"):
            event.stop()
            self._request_schedule()

    _text_chosen = False  # "after a text" was picked in the form (its text may not be typed yet)

    def forget_choices(self) -> None:
        """Another conversation's steering is shown: the form shows its schedule, not what was picked before."""
        self._text_chosen = False

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "sched-when":
            self._text_chosen = event.value == "text"
        if event.select.id in ("sched-apply", "sched-when"):
            event.stop()
            self.query_one("#sched-text-row").display = self.query_one("#sched-when", Select).value == "text"
            self._request_schedule()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id and event.input.id.startswith("add-"):
            event.stop()
            self._request_add()

    def _request_schedule(self) -> None:
        n = _int(self.query_one("#sched-tokens", Input).value)
        if n is None or n < 0:
            self.show_error("+ tok: a number of generated tokens (0: none)")
            return
        when = self.query_one("#sched-when", Select).value
        text = THINK_END if when == "think" else (self.query_one("#sched-text", Input).value or None) if when == "text" else None
        apply_to = "generated" if self.query_one("#sched-apply", Select).value == "generated" else "all"
        self.post_message(self.ScheduleChanged(Schedule(apply_to, n, text)))

    def _request_add(self) -> None:
        layer = _int(self.query_one("#add-layer", Input).value)
        expert = _int(self.query_one("#add-expert", Input).value)
        action = str(self.query_one("#add-action", Select).value)
        raw_value = self.query_one("#add-value", Input).value.strip()
        value = _num(raw_value) if raw_value else None
        if layer is None or expert is None:
            self.show_error("Give a layer and an expert (numbers), e.g. layer 1, expert 3")
            return
        if action in ("bias", "scale") and value is None:
            self.show_error(f"'{action}' needs a value (bias: -2 discourages, 2 encourages; scale: 0.5 halves, 2 doubles)")
            return
        self.post_message(self.EntryAdded(layer, expert, action, value if action in ("bias", "scale") else None))

    def request_remove(self) -> None:
        self._request_remove()

    def _request_remove(self) -> None:
        table = self.query_one(ExpertTable)
        if not table.row_count:
            self.show_error("No steered expert to remove")
            return
        self.post_message(self.EntryRemoved(table.cursor_row))


class ExpertTable(DataTable):
    """The steered experts; delete / backspace removes the selected one."""

    BINDINGS = [Binding("delete,backspace", "remove", "Remove expert")]

    def action_remove(self) -> None:
        panel = next((a for a in self.ancestors if isinstance(a, SteeringPanel)), None)
        if panel is not None:
            panel.request_remove()


def _num(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


def _int(s: str) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None
