"""`moe-gguf chat`: a terminal chat with live expert steering, on the moe_gguf Python API.

    run_chat(model_path="model.gguf", n_gpu_layers=-1, n_ctx=4096, profiles=["quiet.json"])
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from moe_gguf.errors import ModelMismatchError, ProfileError
from moe_gguf.formats.profile import Schedule
from moe_gguf.tui.config import Config, Sampling, load_config
from moe_gguf.tui.paths import data_dir
from moe_gguf.tui.screens.chat import ChatScreen
from moe_gguf.tui.screens.conversations import ConversationsChanged
from moe_gguf.tui.screens.dialogs import FilePicker
from moe_gguf.tui.session import ChatSession
from moe_gguf.tui.store import ConversationStore
from moe_gguf.tui.widgets.steering import SteeringPanel


class MoEChatApp(App):
    TITLE = "moe-gguf chat"
    # each screen's TCSS lives next to it; all are loaded here (screen-level CSS_PATH is not applied to the default screen)
    CSS_PATH = ["app.tcss", "screens/chat.tcss", "screens/dialogs.tcss"]
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", id="quit", priority=True)]
    # responsive classes on every screen (see app.tcss): the side panel overlays below 100 columns, dialogs fill
    # small terminals
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide"), (150, "-xwide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]

    def __init__(self, *, model_path: str | os.PathLike | None = None, n_gpu_layers: int = 0, n_ctx: int = 2048,
                 threads: int | None = None, expert_used_count: int | None = None, profiles: Sequence[str] = (),
                 system_prompt: str | None = None, store: ConversationStore | None = None,
                 config: Config | None = None, stable_stats: bool = False, sampling: Sampling | None = None,
                 allow_model_mismatch: bool = False, **model_options: Any) -> None:
        """model_options: the rest of llama.cpp's loading options (cpu_moe, n_cpu_moe, override_tensor, no_repack,
        or MoEModel / llama_cpp.Llama keywords), handed to ChatSession. allow_model_mismatch: apply profiles made
        for another model when their entries fit (a switch in the Steer tab too)."""
        super().__init__()
        self.session = ChatSession(model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads,
                                   expert_used_count=expert_used_count, **model_options)
        self.session.allow_mismatch = allow_model_mismatch
        self.config = config if config is not None else load_config()
        self.store = store if store is not None else ConversationStore(data_dir() / "conversations.db")
        self.store.recover()
        self.initial_profiles = [str(p) for p in profiles]
        # precedence: the command line, then the config file. Sampling settings belong to a conversation (saved
        # with it, restored on resume); a new session starts from the config file's
        self.system_prompt = system_prompt if system_prompt is not None else (self.config.system_prompt or "")
        self.sampling = sampling or self.config.sampling
        self.stable_stats = stable_stats  # snapshot tests: no timing-dependent numbers on screen

    # -- startup --

    def get_default_screen(self) -> Screen:
        return ChatScreen()

    @property
    def chat(self) -> ChatScreen:
        return next(s for s in self.screen_stack if isinstance(s, ChatScreen))

    def on_mount(self) -> None:
        for error in self.config.errors:
            self.notify(error, title="Config", severity="warning", timeout=10)
        if self.config.bindings:
            self.set_keymap({bid: keys for bid, keys in self.config.bindings.items()})
        theme = self.config.theme or self.store.get_state("theme")
        if theme:
            if theme in self.available_themes:
                self.theme = theme
            else:
                self.notify(f"Unknown theme {theme!r}; available: {', '.join(sorted(self.available_themes))}",
                            severity="warning")
        self.theme_changed_signal.subscribe(self, lambda t: self.store.set_state("theme", t.name))

    def chat_mounted(self) -> None:
        """The chat screen is up: load the model (in a worker)."""
        if not self.session.ready:
            self.load_model(self.session.model_path)

    def on_unmount(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                screen._stop.set()
                screen.interrupted()
        self.workers.cancel_all()

    # -- model --

    def load_model(self, path: Path | None, then: Callable[[], None] | None = None) -> None:
        """Load a model in a worker; `then` runs on the UI thread once it is loaded."""
        if self.chat.generating:
            self.notify("Still generating: press Esc to stop first", severity="warning")
            return
        self.chat.model_loading(path.name if path else "the demo model")
        self._load_model(path, then)

    @work(thread=True, exclusive=True, group="load")
    def _load_model(self, path: Path | None, then: Callable[[], None] | None = None) -> None:
        previous = self.session.model_path
        self.session.model_path = None if path is None else Path(path)
        try:
            self.session.load()
        except Exception as e:  # missing file, not a GGUF, not MoE, patch missing: show it, keep running
            self.session.model_path = previous if self.session.ready else self.session.model_path
            self.call_from_thread(self._model_failed, e)
            return
        self.call_from_thread(self._model_loaded, then)

    def _model_failed(self, error: Exception) -> None:
        msg = str(error) or type(error).__name__
        self.chat.show_error(f"[b]Could not load the model[/b]\n{msg}\n\nOpen another one: ctrl+p → Open model")
        self.chat.update_status("model not loaded")
        self.notify(msg, title="Model", severity="error", timeout=10)

    def _model_loaded(self, then: Callable[[], None] | None = None) -> None:
        self.chat.show_error("")
        self.chat.model_ready()
        if self.initial_profiles:
            paths, self.initial_profiles = self.initial_profiles, []
            self.load_profiles(paths)
        if self.session.notice:
            self.notify(self.session.notice, title="Demo model", severity="warning", timeout=10)
        if self.session.profile_notice:
            self.notify(self.session.profile_notice, title="Steering profile", severity="warning", timeout=12)
        self.show_profile_warnings()
        if then is not None:
            then()
        else:
            self.chat.save_settings()  # the conversation continues on this model
        topo = self.session.topology
        self.notify(f"{topo.name}: {len(topo.moe_layers)} MoE layers × {topo.n_expert} experts, "
                    f"{topo.n_expert_used} per token", title="Model loaded")

    # -- profiles --

    def load_profile(self, path: Path) -> None:
        self.load_profiles([path])

    def load_profiles(self, paths: Sequence[str | os.PathLike]) -> bool:
        try:
            profile = self.session.load_profiles(paths)
        except ModelMismatchError as e:
            msg = str(e).replace("(--allow-model-mismatch)", "(switch on 'allow other model' in the Steer tab)")
            self.chat.refresh_steering(error=msg)
            self.notify(msg, title="Profile for another model", severity="error", timeout=10)
            return False
        except ProfileError as e:
            self.chat.refresh_steering(error=str(e))
            self.notify(str(e), title="Profile not loaded", severity="error", timeout=10)
            return False
        self.chat.refresh_steering()
        self.chat.save_settings()
        self.notify(f"Profile {profile.name or 'untitled'}: {len(profile.entries)} entries", title="Profile loaded")
        self.show_profile_warnings()
        return True

    def show_profile_warnings(self) -> None:
        """Warnings from checking a profile against the model (same shape, other router weights)."""
        for message in self.session.take_warnings():
            self.notify(message, title="Profile made for other weights", severity="warning", timeout=12)

    async def on_conversations_changed(self, event: ConversationsChanged) -> None:
        await self.chat.conversations_changed(event)

    # -- settings --

    def set_settings(self, system_prompt: str, sampling: Sampling) -> None:
        """The current conversation's system prompt and sampling (the chat screen saves them with it)."""
        self.system_prompt = system_prompt
        self.sampling = sampling

    # -- export --

    def export_conversation(self, cid: int, fmt: str, directory: Path | None = None) -> Path | None:
        conv = self.store.conversation(cid)
        if conv is None:
            self.notify("No such conversation", severity="error")
            return None
        directory = directory or data_dir() / "exports"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", conv.title).strip("-")[:40] or "conversation"
        path = directory / f"{cid:04d}-{slug}.{fmt}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            text = self.store.export_markdown(cid) if fmt == "md" else self.store.export_json(cid)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            self.notify(f"Could not export: {e}", severity="error")
            return None
        self.notify(f"Exported to {path}", title="Export")
        return path

    # -- command palette --

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = self.chat
        yield SystemCommand("New conversation", "Start a new, empty conversation", chat.action_new_chat)
        yield SystemCommand("Conversations", "Resume, rename, delete or export saved conversations",
                            chat.action_conversations)
        yield SystemCommand("Settings", "System prompt, temperature, top-p, max tokens, seed", chat.action_settings)
        yield SystemCommand("Toggle steering", "Steering on / off for the next reply", chat.action_toggle_steering)
        yield SystemCommand("Compare mode", "Answer steered and unsteered side by side (same batch)", chat.action_compare)
        yield SystemCommand("Load steering profile", "Open a profile .json", chat.pick_profile)
        yield SystemCommand("Save steering profile", "Save the working profile as .json", chat.save_profile_dialog)
        yield SystemCommand("New steering profile", "Start an empty profile for this model",
                            lambda: chat.on_steering_panel_profile_command(SteeringPanel.ProfileCommand("new")))
        yield SystemCommand("Regenerate", "Answer the last message again", chat.action_regenerate)
        yield SystemCommand("Previous reply version", "Bring back the reply a regenerate replaced (again: the one "
                            "before)", chat.action_previous_version)
        yield SystemCommand("Edit last message", "Put the last message back in the input to edit and resend",
                            chat.action_edit_last)
        yield SystemCommand("Copy reply", "Copy the last reply to the clipboard", chat.action_copy_reply)
        yield SystemCommand("Copy code block", "Copy a code block of the last reply", chat.action_copy_code)
        yield SystemCommand("Toggle side panel", "Show or hide steering / experts / tokens", chat.action_toggle_panel)
        yield SystemCommand("Show experts heatmap", "Routing of the current reply, layer × expert",
                            lambda: chat.show_tab("tab-experts"))
        yield SystemCommand("Show token routing", "Pick a generated token, see its experts per layer",
                            lambda: chat.show_tab("tab-tokens"))
        yield SystemCommand("Steer after thinking", "Reasoning models: steer only once the reply closes </think>",
                            lambda: chat.on_steering_panel_schedule_changed(SteeringPanel.ScheduleChanged(
                                Schedule("generated", 0, "</think>"))))
        yield SystemCommand("Open model", "Load another GGUF model", self.action_open_model)
        if chat.conversation_id is not None:
            cid = chat.conversation_id
            yield SystemCommand("Export conversation as Markdown", "Write a .md transcript",
                                lambda: self.export_conversation(cid, "md"))
            yield SystemCommand("Export conversation as JSON", "Write a .json transcript with settings and profiles",
                                lambda: self.export_conversation(cid, "json"))

    def action_open_model(self) -> None:
        start = self.session.model_path.parent if self.session.model_path else Path.cwd()

        def done(path: Path | None) -> None:
            if path is not None:
                self.load_model(path)

        self.push_screen(FilePicker("Open a MoE GGUF model", start=start, suffixes=(".gguf",)), done)


def run_chat(*, model_path: str | os.PathLike | None = None, n_gpu_layers: int = 0, n_ctx: int = 2048,
             threads: int | None = None, expert_used_count: int | None = None, profiles: Sequence[str] = (),
             system_prompt: str | None = None, allow_model_mismatch: bool = False, **model_options: Any) -> None:
    """Run the chat UI (the `moe-gguf chat` command). Without a model path: the shipped demo model.

    model_options: cpu_moe, n_cpu_moe, override_tensor, no_repack (llama.cpp's --cpu-moe, --n-cpu-moe, -ot,
    --no-repack), passed through to the model.
    """
    app = MoEChatApp(model_path=model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads,
                     expert_used_count=expert_used_count, profiles=profiles, system_prompt=system_prompt,
                     allow_model_mismatch=allow_model_mismatch, **model_options)
    try:
        app.run()
    finally:
        app.session.close()
        app.store.close()
