"""System prompt and sampling settings (temperature, top-p, max tokens, seed) of the current conversation."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from moe_gguf.tui.config import Sampling


class SettingsScreen(ModalScreen[tuple[str, Sampling] | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, system_prompt: str, sampling: Sampling, *, n_ctx: int | None = None,
                 conversation: str | None = None) -> None:
        super().__init__()
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.conversation = conversation

    def compose(self) -> ComposeResult:
        s = self.sampling
        with Vertical(classes="dialog", id="settings-dialog"):
            yield Label("Settings of this conversation", classes="dialog-title")
            where = f"“{self.conversation}”" if self.conversation else "the new conversation"
            yield Static(f"Saved with {where} and restored when you resume it, like its steering and compare mode; "
                         "a new conversation starts with the current ones.", classes="dialog-help", id="settings-scope")
            yield Label("System prompt")
            yield TextArea(self.system_prompt, id="system-prompt", soft_wrap=True)
            with Grid(id="sampling-grid"):
                yield Label("temperature (0: greedy)")
                yield Input(f"{s.temperature:g}", id="temperature", type="number")
                yield Label("top-p")
                yield Input(f"{s.top_p:g}", id="top-p", type="number")
                yield Label("max tokens")
                yield Input(str(s.max_tokens), id="max-tokens", type="integer")
                yield Label("seed")
                yield Input("" if s.seed is None else str(s.seed), id="seed", type="integer",
                            placeholder="random per reply")
            yield Static("", id="settings-error", classes="panel-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="settings-save", compact=True)
                yield Button("Cancel", id="settings-cancel", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "settings-save":
            self.action_save()
        else:
            self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        try:
            seed = self.query_one("#seed", Input).value.strip()
            sampling = Sampling(temperature=float(self.query_one("#temperature", Input).value),
                                top_p=float(self.query_one("#top-p", Input).value),
                                max_tokens=int(self.query_one("#max-tokens", Input).value),
                                seed=int(seed) if seed else None)
            sampling.check()
            if self.n_ctx is not None and sampling.max_tokens > self.n_ctx // 2:
                raise ValueError(f"max tokens must be at most {self.n_ctx // 2}, half the context of {self.n_ctx}: "
                                 "the rest holds the conversation (compare mode needs it twice); "
                                 "restart with a larger context (-c) for longer replies")
        except ValueError as e:
            msg = str(e) if "must" in str(e) else f"not a number: {e}"
            error = self.query_one("#settings-error", Static)
            error.update(msg)
            error.add_class("-visible")
            return
        self.dismiss((self.query_one("#system-prompt", TextArea).text, sampling))

    def action_cancel(self) -> None:
        self.dismiss(None)
