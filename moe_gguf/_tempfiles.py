"""Temp files for atomic saves (write, fsync, os.replace), and the cleanup of those a killed writer left.

A temp file is named after its target, host and process: ``.NAME.HOST-PID.RANDOM.tmp``. Before a save
makes one, temp files of the same target from dead processes on this host are removed, so SIGKILLed saves
do not pile up; another live writer's file, or one from another host (network file systems), is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from pathlib import Path


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, another user's
        return True
    return True


def sweep_stale(path: Path) -> int:
    """Remove temp files for ``path`` left by dead processes on this host; returns how many."""
    head = f".{path.name}.{_host()}-"
    removed = 0
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        pid = name[len(head):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                removed += 1
    return removed


def mkstemp_for(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file next to ``path`` (same file system, so os.replace is atomic)."""
    sweep_stale(path)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp")
