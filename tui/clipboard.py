"""Copy to the clipboard, and say plainly whether it worked.

A clipboard tool (pbcopy, wl-copy, xclip, xsel) is used where one is present and usable (a display for the X11 /
Wayland ones); inside tmux, the text also goes to tmux's paste buffer. Textual's OSC 52 escape is always sent as
well, but a terminal may ignore it silently (tmux does by default), so it alone is never reported as a copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

TIMEOUT_S = 2.0


def _tools() -> list[tuple[str, Sequence[str]]]:
    """Clipboard commands to try, in order, that can work here."""
    out: list[tuple[str, Sequence[str]]] = []
    if sys.platform == "darwin" or shutil.which("pbcopy"):
        out.append(("pbcopy", ["pbcopy"]))
    if os.environ.get("WAYLAND_DISPLAY"):
        out.append(("wl-copy", ["wl-copy"]))
    if os.environ.get("DISPLAY"):
        out.append(("xclip", ["xclip", "-selection", "clipboard", "-in"]))
        out.append(("xsel", ["xsel", "--clipboard", "--input"]))
    if os.environ.get("TMUX"):  # -w: on to the terminal's clipboard too (tmux >= 3.2); older tmux: the buffer only
        out += [("tmux", ["tmux", "load-buffer", "-w", "-"]), ("tmux", ["tmux", "load-buffer", "-"])]
    return [(name, cmd) for name, cmd in out if shutil.which(cmd[0])]


def copy_with_tools(text: str) -> tuple[str | None, list[str]]:
    """Run the first clipboard tool that works: (its name or None, problems of the ones that failed)."""
    problems: list[str] = []
    for name, cmd in _tools():
        try:
            done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"{name}: {e}")
            continue
        if done.returncode == 0:
            return name, problems
        problems.append(f"{name}: {done.stderr.decode('utf-8', 'replace').strip() or f'exit {done.returncode}'}")
    return None, problems


def copy_text(app: Any, text: str, what: str) -> bool:
    """Copy `text` (described as `what`) and notify the user of the outcome; True if a tool confirmed it."""
    app.copy_to_clipboard(text)  # OSC 52: works in many terminals, unconfirmable
    tool, problems = copy_with_tools(text)
    if tool == "tmux":
        app.notify(f"Copied {what} to tmux's paste buffer (prefix + ] pastes it; the system clipboard too if tmux "
                   "has set-clipboard on)", title="Copy")
        return True
    if tool is not None:
        app.notify(f"Copied {what} (with {tool})", title="Copy")
        return True
    why = f" ({'; '.join(problems)})" if problems else ""
    app.notify(f"Could not confirm the copy of {what}: no clipboard tool worked (pbcopy, wl-copy, xclip, xsel){why}. "
               "It was also sent to the terminal (OSC 52), which some terminals accept and others ignore; select the "
               "text with the mouse (shift+drag in most terminals) if it is not in your clipboard.",
               title="Copy", severity="warning", timeout=10)
    return False
