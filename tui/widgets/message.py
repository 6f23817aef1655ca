"""A chat message: role header with clickable actions, markdown body (streamed, then rendered in full).

A reasoning model's ``<think>…</think>`` part is shown in a collapsible block above the answer (open while it
streams, folded once the answer starts); a user message is shown as typed (its line breaks kept)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static

from moe_gguf.tui.clipboard import copy_text
from moe_gguf.tui.thinking import split_thinking

_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


def visible(text: str) -> str:
    """`text` with control characters (a model can emit any byte) shown as their Unicode symbols (␈, ␛, ...),
    so they never reach the terminal (or an SVG screenshot) as control codes."""
    return text.translate(_CONTROL)


def code_blocks(markdown: str) -> list[str]:
    """The fenced / indented code blocks of a markdown text, in order."""
    from markdown_it import MarkdownIt

    return [t.content for t in MarkdownIt("commonmark").parse(markdown) if t.type in ("fence", "code_block")]


class _Header(Static):
    """Role, details and [copy] [code] [edit] / [regen] links; clicks run the message's actions."""

    async def action_msg(self, name: str) -> None:
        view = next((a for a in self.ancestors if isinstance(a, MessageView)), None)
        if view is not None:
            await view.run_action(name)


class MessageView(Vertical, can_focus=True):
    """One user or assistant message. Focus it (click, tab) for c / b / e / r (t: fold / unfold the thinking)."""

    BINDINGS = [
        Binding("c", "copy", "Copy"),
        Binding("b", "copy_code", "Copy code"),
        Binding("e", "edit", "Edit & resend"),
        Binding("r", "regenerate", "Regenerate"),
        Binding("u", "previous_version", "Earlier version", show=False),
        Binding("t", "toggle_thinking", "Thinking", show=False),
    ]

    class Action(Message):
        """Edit or regenerate asked for on this message (handled by the chat screen)."""

        def __init__(self, view: MessageView | CompareView, action: str) -> None:
            super().__init__()
            self.view = view
            self.action = action

    def __init__(self, role: str, content: str = "", *, mid: int | None = None, title: str | None = None,
                 info: str = "", streaming: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.role = role
        self.content = content
        self.mid = mid
        self.title = title or ("You" if role == "user" else "Assistant")
        self.info = info
        self.streaming = streaming
        self._stream = None
        self._code_index = 0
        self._answer = ""  # the answer part shown in the markdown body (the content without its thinking)
        self._thinking: str | None = None
        self.add_class(f"-{role}")

    def compose(self) -> ComposeResult:
        yield _Header(self._header_markup(), classes="message-header")
        if self.role == "user":  # as typed: markdown would join its lines
            yield Static(Text(visible(self.content)), classes="message-body user-text")
            return
        split = split_thinking(self.content)
        self._answer, self._thinking = split.answer, split.thinking
        with Collapsible(title=self._thinking_title(split.thinking_done), collapsed=split.thinking_done,
                         classes="thinking") as fold:
            fold.display = split.thinking is not None
            yield Static(Text(visible(split.thinking or "")), classes="thinking-text")
        yield Markdown(visible(self._answer), classes="message-body")

    def _thinking_title(self, done: bool) -> str:
        n = len((self._thinking or "").split())
        return f"Thought ({n} words) · t unfolds" if done else "Thinking…"

    def _header_markup(self) -> str:
        links = "[@click=msg('copy')]copy[/] [@click=msg('copy_code')]code[/]"
        links += " [@click=msg('edit')]edit[/]" if self.role == "user" else " [@click=msg('regenerate')]regen[/]"
        info = f" [dim]{self.info}[/]" if self.info else ""
        working = " [dim]…[/]" if self.streaming else ""
        return f"[b]{self.title}[/b]{info}{working}  [dim]{links}[/]"

    @property
    def answer(self) -> str:
        """The reply without its thinking (what copy and code blocks use)."""
        return self.content if self.role == "user" else split_thinking(self.content).answer

    def set_info(self, info: str) -> None:
        self.info = info
        self.query_one(_Header).update(self._header_markup())

    @property
    def markdown(self) -> Markdown:
        return self.query_one(".message-body", Markdown)

    def _show_thinking(self, thinking: str | None, done: bool) -> None:
        fold = self.query_one(".thinking", Collapsible)
        if thinking is None:
            fold.display = False
            return
        was_done = self._thinking is not None and fold.title != "Thinking…"
        self._thinking = thinking
        fold.display = True
        self.query_one(".thinking-text", Static).update(Text(visible(thinking)))
        fold.title = self._thinking_title(done)
        if done and not was_done:
            fold.collapsed = True  # the answer starts: fold the thinking away

    async def stream_to(self, text: str) -> None:
        """Show `text` (the whole reply so far): appends the new part, re-renders if earlier text changed."""
        if text == self.content:
            return
        self.content = text
        split = split_thinking(text)
        self._show_thinking(split.thinking, split.thinking_done)
        answer = split.answer
        if answer == self._answer:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        if answer.startswith(self._answer):
            delta, self._answer = answer[len(self._answer):], answer
            await self._stream.write(visible(delta))
        else:  # a multi-byte character completed: redo from the start
            await self._stream.stop()
            self._answer = answer
            await self.markdown.update(visible(answer))
            self._stream = Markdown.get_stream(self.markdown)

    async def finish(self, text: str, info: str | None = None) -> None:
        """Stop streaming and render the final text in full."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.content = text
        self.streaming = False
        split = split_thinking(text)
        self._show_thinking(split.thinking, True)
        self._answer = split.answer
        await self.markdown.update(visible(split.answer))
        if info is not None:
            self.info = info
        self.query_one(_Header).update(self._header_markup())

    # -- actions --

    def action_copy(self) -> None:
        text = self.answer
        copy_text(self.app, text, f"the {'message' if self.role == 'user' else 'reply'} ({len(text)} characters)")

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.answer)
        if not blocks:
            self.notify("No code block in this message", severity="warning")
            return
        i = self._code_index % len(blocks)
        self._code_index = i + 1
        copy_text(self.app, blocks[i], f"code block {i + 1} of {len(blocks)}")

    def action_toggle_thinking(self) -> None:
        folds = self.query(".thinking").results(Collapsible)
        fold = next((f for f in folds if f.display), None)
        if fold is None:
            self.notify("This reply has no thinking part", severity="warning")
            return
        fold.collapsed = not fold.collapsed

    def action_edit(self) -> None:
        self.post_message(self.Action(self, "edit"))

    def action_regenerate(self) -> None:
        self.post_message(self.Action(self, "regenerate"))

    def action_previous_version(self) -> None:
        self.post_message(self.Action(self, "previous_version"))


class CompareView(Vertical, can_focus=True):
    """A compare-mode reply: steered and unsteered answers side by side (same prompt, same batch)."""

    BINDINGS = MessageView.BINDINGS

    def __init__(self, steered: str = "", unsteered: str = "", *, mid: int | None = None, info: str = "",
                 streaming: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.mid = mid
        self.role = "assistant"
        self._texts = (steered, unsteered)
        self._info = info
        self._streaming = streaming

    def compose(self) -> ComposeResult:
        with Horizontal(classes="compare-row"):
            yield MessageView("assistant", self._texts[0], title="Steered", info=self._info, streaming=self._streaming,
                              id="steered", classes="compare-side")
            yield MessageView("assistant", self._texts[1], title="Unsteered", streaming=self._streaming,
                              id="unsteered", classes="compare-side")

    @property
    def content(self) -> str:
        return self.sides[0].content

    @property
    def sides(self) -> tuple[MessageView, MessageView]:
        return self.query_one("#steered", MessageView), self.query_one("#unsteered", MessageView)

    async def stream_to(self, steered: str, unsteered: str) -> None:
        a, b = self.sides
        await a.stream_to(steered)
        await b.stream_to(unsteered)

    async def finish(self, steered: str, unsteered: str, info: str | None = None) -> None:
        a, b = self.sides
        await a.finish(steered, info)
        await b.finish(unsteered)

    def set_info(self, info: str) -> None:
        self.sides[0].set_info(info)

    def action_copy(self) -> None:
        self.sides[0].action_copy()

    def action_copy_code(self) -> None:
        self.sides[0].action_copy_code()

    def action_toggle_thinking(self) -> None:
        self.sides[0].action_toggle_thinking()

    def action_edit(self) -> None:
        pass

    def action_regenerate(self) -> None:
        self.post_message(MessageView.Action(self, "regenerate"))

    def action_previous_version(self) -> None:
        self.post_message(MessageView.Action(self, "previous_version"))
