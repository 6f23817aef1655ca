"""Conversations in SQLite, written as they happen: every message is committed when it is added, and a
streaming reply is updated while it streams, so a crash or a kill loses at most the last fraction of a second.

Each assistant message keeps what produced it: sampling settings (with the seed actually used), the steering
profile (JSON, with strength, on/off and schedule), the unsteered reply in compare mode, speed and token counts,
and its routing (per-layer expert counts, thinking and answer apart; per-token routes when small).

Each conversation keeps its own settings (model path, steering, compare mode, sampling), restored on resume.

Schema versions (PRAGMA user_version): 1 the first; 2 adds conversations.settings and messages.routing.
Older databases are migrated in place when opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'done',
    meta TEXT NOT NULL DEFAULT '{}',
    routing TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = 2
# columns added after version 1: (table, column, definition)
_ADDED = [("conversations", "settings", "TEXT NOT NULL DEFAULT '{}'"), ("messages", "routing", "TEXT NOT NULL DEFAULT ''")]


@dataclass
class Message:
    id: int
    role: str  # "user" | "assistant"
    content: str
    status: str = "done"  # "done" | "streaming" | "stopped" | "error"
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    routing: dict[str, Any] | None = None  # see ChatSession.routing_summary


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    model: str = ""
    system_prompt: str = ""
    n_messages: int = 0


class ConversationStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._migrate()

    def _migrate(self) -> None:
        """Create the tables, or bring an older database up to SCHEMA_VERSION (nothing is lost)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "conversations" in tables and version < SCHEMA_VERSION:
            for table, column, definition in _ADDED:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self._db.executescript(SCHEMA)
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def recover(self) -> int:
        """Mark replies that were streaming when the app died as stopped (their text so far is kept)."""
        return self._x("UPDATE messages SET status = 'stopped' WHERE status = 'streaming'").rowcount

    def _x(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:  # autocommit: every statement is durable when it returns
            return self._db.execute(sql, args)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- conversations --

    def new_conversation(self, title: str, *, model: str = "", system_prompt: str = "") -> int:
        now = time.time()
        cur = self._x("INSERT INTO conversations (title, created, updated, model, system_prompt) VALUES (?, ?, ?, ?, ?)",
                      (title, now, now, model, system_prompt))
        return int(cur.lastrowid)

    def conversations(self) -> list[Conversation]:
        rows = self._x("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n "
                       "FROM conversations c ORDER BY c.updated DESC, c.id DESC").fetchall()
        return [Conversation(r["id"], r["title"], r["created"], r["updated"], r["model"], r["system_prompt"], r["n"])
                for r in rows]

    def conversation(self, cid: int) -> Conversation | None:
        r = self._x("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n "
                    "FROM conversations c WHERE c.id = ?", (cid,)).fetchone()
        return None if r is None else Conversation(r["id"], r["title"], r["created"], r["updated"], r["model"],
                                                   r["system_prompt"], r["n"])

    def rename(self, cid: int, title: str) -> None:
        self._x("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))

    def set_system_prompt(self, cid: int, system_prompt: str) -> None:
        self._x("UPDATE conversations SET system_prompt = ?, updated = ? WHERE id = ?", (system_prompt, time.time(), cid))

    def settings(self, cid: int) -> dict[str, Any]:
        """The conversation's own settings (model path, steering, compare, sampling); {} if none were saved."""
        r = self._x("SELECT settings FROM conversations WHERE id = ?", (cid,)).fetchone()
        try:
            return json.loads(r["settings"] or "{}") if r is not None else {}
        except json.JSONDecodeError:
            return {}

    def set_settings(self, cid: int, settings: dict[str, Any]) -> None:
        self._x("UPDATE conversations SET settings = ? WHERE id = ?", (json.dumps(settings), cid))

    def delete(self, cid: int) -> None:
        self._x("DELETE FROM conversations WHERE id = ?", (cid,))

    # -- messages --

    def add_message(self, cid: int, role: str, content: str, *, status: str = "done",
                    meta: dict[str, Any] | None = None) -> int:
        now = time.time()
        cur = self._x("INSERT INTO messages (conversation_id, role, content, created, status, meta) VALUES (?, ?, ?, ?, ?, ?)",
                      (cid, role, content, now, status, json.dumps(meta or {})))
        self._x("UPDATE conversations SET updated = ? WHERE id = ?", (now, cid))
        return int(cur.lastrowid)

    def update_message(self, mid: int, content: str, *, status: str | None = None,
                       meta: dict[str, Any] | None = None, routing: dict[str, Any] | None = None) -> None:
        sets, args = ["content = ?"], [content]
        if routing is not None:
            sets.append("routing = ?")
            args.append(json.dumps(routing))
        if status is not None:
            sets.append("status = ?")
            args.append(status)
        if meta is not None:
            sets.append("meta = ?")
            args.append(json.dumps(meta))
        self._x(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", (*args, mid))

    def messages(self, cid: int) -> list[Message]:
        rows = self._x("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (cid,)).fetchall()
        return [Message(r["id"], r["role"], r["content"], r["status"], json.loads(r["meta"] or "{}"), r["created"],
                        _routing(r["routing"])) for r in rows]

    def delete_message(self, mid: int) -> None:
        self._x("DELETE FROM messages WHERE id = ?", (mid,))

    def delete_from(self, cid: int, mid: int) -> None:
        """Delete message `mid` and every later message of the conversation (edit / regenerate)."""
        self._x("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (cid, mid))

    def prompt_history(self, limit: int = 500) -> list[str]:
        """Earlier user prompts, oldest first, without repeats."""
        rows = self._x("SELECT content FROM messages WHERE role = 'user' ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        seen: set[str] = set()
        out: list[str] = []
        for r in rows:
            if r["content"] not in seen:
                seen.add(r["content"])
                out.append(r["content"])
        return out[::-1]

    # -- UI state (theme, sampling defaults) --

    def get_state(self, key: str, default: Any = None) -> Any:
        r = self._x("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return default if r is None else json.loads(r["value"])

    def set_state(self, key: str, value: Any) -> None:
        self._x("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)))

    # -- export --

    def export_json(self, cid: int) -> str:
        conv = self.conversation(cid)
        if conv is None:
            raise KeyError(f"no conversation {cid}")
        return json.dumps({
            "format": "moe-gguf-conversation", "version": 1,
            "title": conv.title, "model": conv.model, "system_prompt": conv.system_prompt,
            "created": conv.created, "updated": conv.updated, "settings": self.settings(cid),
            "messages": [{"role": m.role, "content": m.content, "status": m.status, "created": m.created, **m.meta}
                         for m in self.messages(cid)],
        }, indent=2, ensure_ascii=False) + "\n"

    def export_markdown(self, cid: int) -> str:
        conv = self.conversation(cid)
        if conv is None:
            raise KeyError(f"no conversation {cid}")
        out = [f"# {conv.title}", ""]
        if conv.model:
            out += [f"Model: `{conv.model}`", ""]
        if conv.system_prompt:
            out += ["## System", "", conv.system_prompt, ""]
        for m in self.messages(cid):
            meta = m.meta
            if m.role == "user":
                out += ["## User", "", m.content, ""]
                continue
            steer = meta.get("steering") or {}
            label = "Assistant"
            if steer.get("enabled") and steer.get("profile"):
                label += f" (steered: {steer['profile'].get('name') or 'profile'}, strength {steer.get('strength', 1.0):g})"
            if m.status == "stopped":
                label += " [stopped]"
            elif meta.get("finish") == "length":
                label += " [cut at max tokens]"
            out += [f"## {label}", "", m.content, ""]
            if "compare" in meta:
                out += ["### Unsteered (compare)", "", meta["compare"], ""]
            s = meta.get("sampling")
            if s:
                out += [f"<sub>temperature {s['temperature']:g}, top-p {s['top_p']:g}, max tokens {s['max_tokens']}, "
                        f"seed {meta.get('seed', s.get('seed'))}</sub>", ""]
        return "\n".join(out).rstrip() + "\n"


def _routing(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data else None
