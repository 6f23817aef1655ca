"""Where the chat UI keeps its files (XDG base directories, overridable by environment variables)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else Path.home() / default


def data_dir() -> Path:
    """Conversations database and exports: $MOE_GGUF_DATA_DIR, else $XDG_DATA_HOME/moe-gguf."""
    override = os.environ.get("MOE_GGUF_DATA_DIR")
    return Path(override).expanduser() if override else _xdg("XDG_DATA_HOME", ".local/share") / "moe-gguf"


def config_dir() -> Path:
    """User configuration (tui.toml / tui.json): $MOE_GGUF_CONFIG_DIR, else $XDG_CONFIG_HOME/moe-gguf."""
    override = os.environ.get("MOE_GGUF_CONFIG_DIR")
    return Path(override).expanduser() if override else _xdg("XDG_CONFIG_HOME", ".config") / "moe-gguf"


def cache_dir() -> Path:
    """Downloaded / generated files (the demo model fallback): $XDG_CACHE_HOME/moe-gguf."""
    return _xdg("XDG_CACHE_HOME", ".cache") / "moe-gguf"
