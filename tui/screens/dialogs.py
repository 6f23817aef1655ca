"""Small modal dialogs: file picker, text prompt, confirmation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Static


class _FilteredTree(DirectoryTree):
    def __init__(self, path: Path, suffixes: tuple[str, ...], **kw) -> None:
        self.suffixes = suffixes
        super().__init__(path, **kw)

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or not self.suffixes or p.suffix.lower() in self.suffixes)]


class FilePicker(ModalScreen[Path | None]):
    """Pick a file from a directory tree, or type a path (needed to save under a new name)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, *, start: Path | None = None, suffixes: tuple[str, ...] = (".json",),
                 save: bool = False, default_name: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.start = (start or Path.cwd()).expanduser()
        self.suffixes = suffixes
        self.save = save
        self.default_name = default_name

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="file-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield _FilteredTree(self.start if self.start.is_dir() else self.start.parent, self.suffixes, id="file-tree")
            initial = str(self.start / self.default_name) if self.default_name else ""
            yield Input(initial, placeholder="path (type one, or pick in the tree)", id="file-path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save" if self.save else "Open", variant="primary", id="file-ok", compact=True)
                yield Button("Cancel", id="file-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#file-path" if self.save else "#file-tree").focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.query_one("#file-path", Input).value = str(event.path)
        if not self.save:
            self.dismiss(Path(event.path))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._ok()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "file-ok":
            self._ok()
        else:
            self.dismiss(None)

    def _ok(self) -> None:
        value = self.query_one("#file-path", Input).value.strip()
        if not value:
            self.notify("Type a path or pick a file", severity="warning")
            return
        self.dismiss(Path(value).expanduser())

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextPrompt(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, id="prompt-input")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="prompt-ok", compact=True)
                yield Button("Cancel", id="prompt-cancel", compact=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value if event.button.id == "prompt-ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "no", "No"), Binding("y", "yes", "Yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(self.question, classes="dialog-title")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", variant="error", id="yes", compact=True)
                yield Button("No (n)", id="no", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)
