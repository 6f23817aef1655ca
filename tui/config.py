"""User configuration of the chat UI: key bindings, theme and default sampling settings.

Read from ``tui.toml`` (or ``tui.json``) in the config directory (see tui.paths.config_dir)::

    theme = "gruvbox"
    system_prompt = "You are a helpful assistant."

    [sampling]
    temperature = 0.7
    top_p = 0.95
    max_tokens = 256
    seed = "random"         # a new random seed for every reply (the default), or a fixed integer

    [bindings]              # binding id = "key[,key...]" (Textual key names)
    send = "enter"
    newline = "ctrl+j,shift+enter"
    toggle_steering = "ctrl+t"

A broken file never stops the app: its problems are listed in ``Config.errors`` and shown as a notification.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moe_gguf.tui.paths import config_dir

# binding id -> (default keys, description); ids are used by Binding(id=...) throughout the app
DEFAULT_BINDINGS: dict[str, tuple[str, str]] = {
    "send": ("enter", "Send the message"),
    "newline": ("ctrl+j,shift+enter", "Insert a newline in the message"),
    "stop": ("escape", "Stop generating"),
    "regenerate": ("ctrl+r", "Regenerate the last reply"),
    "edit_last": ("ctrl+g", "Edit the last message and resend it"),
    "copy_reply": ("f5", "Copy the last reply"),
    "copy_code": ("ctrl+b", "Copy a code block of the last reply (again: the next one)"),
    "new_chat": ("ctrl+n", "Start a new conversation"),
    "conversations": ("ctrl+o", "List conversations: resume, rename, delete, export"),
    "settings": ("ctrl+s", "System prompt and sampling settings"),
    "toggle_steering": ("ctrl+t", "Steering on / off"),
    "compare": ("ctrl+l", "Compare mode: steered and unsteered side by side"),
    "toggle_panel": ("f3", "Show / hide the side panel"),
    "next_tab": ("f2", "Side panel: next tab (Steer, Experts, Tokens), opening the panel"),
    "focus_input": ("f4", "Focus the message input"),
    "quit": ("ctrl+q", "Quit"),
}


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None  # None: a new random seed for every reply (regenerate gives another answer)

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sampling:
        """Known keys with the right types; raises ValueError naming a bad one. seed: an integer, or
        "random" / null for a random seed per reply."""
        out = cls()
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "seed" and (v is None or v == "random"):
                out.seed = None
                continue
            kind = int if f.name in ("max_tokens", "seed") else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
                raise ValueError(f"sampling.{f.name} must be {'an integer' if kind is int else 'a number'}, found {v!r}")
            setattr(out, f.name, kind(v))
        out.check()
        return out

    def check(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature must be in [0, 10], found {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1], found {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max tokens must be >= 1, found {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2^31) or empty for a random seed per reply, found {self.seed}")


@dataclass
class Config:
    theme: str | None = None
    system_prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    bindings: dict[str, str] = field(default_factory=dict)  # binding id -> keys (only the overridden ones)
    path: Path | None = None
    errors: list[str] = field(default_factory=list)

    def keys(self, binding_id: str) -> list[str]:
        """The keys of a binding, configured or default."""
        raw = self.bindings.get(binding_id) or DEFAULT_BINDINGS[binding_id][0]
        return [k.strip() for k in raw.split(",") if k.strip()]


def load_config(directory: Path | None = None) -> Config:
    directory = config_dir() if directory is None else directory
    cfg = Config()
    for name in ("tui.toml", "tui.json"):
        path = directory / name
        if path.is_file():
            cfg.path = path
            break
    else:
        return cfg
    try:
        text = cfg.path.read_text(encoding="utf-8")
        if cfg.path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # unreadable or malformed: defaults, and say why
        cfg.errors.append(f"{cfg.path}: {e}; using the defaults")
        return cfg
    if not isinstance(data, dict):
        cfg.errors.append(f"{cfg.path}: expected a table/object at the top level; using the defaults")
        return cfg
    for key in data:
        if key not in ("theme", "system_prompt", "sampling", "bindings"):
            cfg.errors.append(f"{cfg.path}: unknown setting {key!r} (known: theme, system_prompt, sampling, bindings)")
    if isinstance(data.get("theme"), str):
        cfg.theme = data["theme"]
    if isinstance(data.get("system_prompt"), str):
        cfg.system_prompt = data["system_prompt"]
    if "sampling" in data:
        try:
            if not isinstance(data["sampling"], dict):
                raise ValueError("[sampling] must be a table")
            cfg.sampling = Sampling.from_dict(data["sampling"])
        except ValueError as e:
            cfg.errors.append(f"{cfg.path}: {e}")
    bindings = data.get("bindings", {})
    if not isinstance(bindings, dict):
        cfg.errors.append(f"{cfg.path}: [bindings] must be a table of id = \"keys\"")
        bindings = {}
    for bid, keys in bindings.items():
        if bid not in DEFAULT_BINDINGS:
            cfg.errors.append(f"{cfg.path}: unknown binding {bid!r}; known: {', '.join(DEFAULT_BINDINGS)}")
        elif not isinstance(keys, str) or not keys.strip():
            cfg.errors.append(f"{cfg.path}: binding {bid!r} must be a string like \"ctrl+t\"")
        else:
            cfg.bindings[bid] = keys
    return cfg
