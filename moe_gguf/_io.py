"""File I/O every layer shares: atomic saves and JSONL reading.

Atomic saves write a temp file, fsync it and os.replace it over the target. Temp files are named after their
target, host and process: ``.NAME.HOST-PID.RANDOM.tmp``. Before a save makes one, temp files of the same target from
dead processes on this host are removed, so SIGKILLed saves do not pile up; another live writer's file, or one from
another host (network file systems), is left alone.

"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from moe_gguf.errors import FileWriteError


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


@contextlib.contextmanager
def atomic_path(path: Path, *, make_dirs: bool = False, what: str = "save") -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; on a clean exit it replaces ``path`` atomically.

    Readers see the old file or the new one, never a partial one. On any failure the temp file is removed,
    the old file is unchanged and an OSError (a full disk, ...) becomes a FileWriteError naming ``path``.
    """
    with _replacing([path], make_dirs=make_dirs, what=what, keep_open=False) as ((_, tmp),):
        yield tmp


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object], *, make_dirs: bool = False) -> None:
    """Write ``data`` (bytes, or ``data(file)`` writing to a binary file) to ``path`` atomically and durably."""
    atomic_write_all([(path, data)], make_dirs=make_dirs)


def atomic_write_all(files: Sequence[tuple[Path, bytes | Callable[[BinaryIO], object]]], *,
                     make_dirs: bool = False) -> None:
    """atomic_write for several files: all are written to temp files, then renamed into place, so a failed
    write (a full disk) leaves every old file as it was."""
    with _replacing([p for p, _ in files], make_dirs=make_dirs) as temps:
        for (_, data), (fd, _tmp) in zip(files, temps, strict=True):
            with os.fdopen(fd, "wb", closefd=False) as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    data(f)
                f.flush()
                os.fsync(f.fileno())


@contextlib.contextmanager
def _replacing(paths: Sequence[Path], *, make_dirs: bool, what: str = "save",
               keep_open: bool = True) -> Iterator[list[tuple[int, Path]]]:
    """Temp files (fd, path) beside ``paths``; after the body, each is renamed over its target.

    ``keep_open=False``: the fds are closed before the body (it writes by path; the fds read -1).
    """
    fds: list[int] = []
    tmps: list[Path] = []

    def close_all() -> None:  # each fd exactly once: a closed number may already belong to another file
        for i, fd in enumerate(fds):
            if fd >= 0:
                fds[i] = -1
                with contextlib.suppress(OSError):
                    os.close(fd)

    path = paths[0]
    try:
        for path in paths:
            if make_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = mkstemp_for(path)
            fds.append(fd)
            tmps.append(Path(tmp))
        if not keep_open:
            close_all()
        yield list(zip(fds, tmps, strict=True))
        close_all()
        for path, tmp in zip(paths, tmps, strict=True):
            # mkstemp makes the file private (0600); keep an existing file's mode, else the usual 0644
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        for path, tmp in zip(paths, tmps, strict=True):
            os.replace(tmp, path)
        _fsync_dir(paths[0].parent)
    except BaseException as e:
        close_all()
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, FileWriteError):
            hint = "; does the directory exist?" if isinstance(e, FileNotFoundError) else ""
            msg = f"{path}: cannot {what} ({e.strerror or e}){hint}; the previous file, if any, was not changed"
            raise (FileWriteError(e.errno, msg) if e.errno is not None else FileWriteError(msg)) from e
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable too (not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: str | os.PathLike[str], *, error: type[Exception] = ValueError) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a UTF-8 JSONL file.

    A line that is not JSON, a file that is not UTF-8 or cannot be read raises ``error`` naming the file and line.
    """
    path = Path(path)
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    with f:
        n = 0
        try:
            for n, line in enumerate(f, 1):  # noqa: B007 (n names the line in errors below)
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                                "one JSON object") from e
                except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; nesting deeper than the stack
                    raise error(f"{path}:{n}: not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise error(f"{path}:{n + 1}: not UTF-8 text (bad byte at offset {e.start} of the line)") from e
