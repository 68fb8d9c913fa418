"""Output folders: one run at a time in each (an exclusive lock naming its holder).

The lock is `fcntl.flock` on FOLDER/.parclean.lock, so the kernel drops it when the holding process ends, however
it ends (kill -9 included); the file stays and says who held it last. Within one process the lock is re-entrant
(a flow and the stage it calls may both take it). A child process (`accelerate launch`) inherits its parent's
locks through PARCLEAN_HELD_LOCKS, honoured only while the holder recorded in the file is one of its ancestors.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".parclean.lock"
HELD_VARIABLE = "PARCLEAN_HELD_LOCKS"
# The names that show which kind of run made a folder, and the kinds each kind's folder also holds.
KINDS = {
    "shard set": ("manifest.json", "sizes.json", "*_stats.json", "*.tar"),
    "cleaning run": ("start.json", "checkpoints", "train_log.jsonl", "result.json"),
    "pipeline run": ("pipeline.yaml", "report.json", "report.md"),
    "diffusers pipeline": ("model_index.json",),
    "model": ("model.safetensors",),
}
HOLDS = {"cleaning run": {"model"}, "pipeline run": {"cleaning run", "model"}}

_held: dict[Path, tuple[int, int]] = {}  # folder -> (lock file descriptor, depth)
_guard = threading.Lock()


class FolderLocked(ValueError):
    """Another run holds the output folder."""


@contextmanager
def output_lock(folder: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold FOLDER's exclusive lock (creating the folder) for the block; FolderLocked at once if another run has it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if _held_by_ancestor(key):
        yield folder
        return
    _acquire(key, folder, command or " ".join(["parclean", *sys.argv[1:]]))
    try:
        yield folder
    finally:
        _release(key)


def contents(folder: str | os.PathLike) -> list[str]:
    """The names in FOLDER, without the lock file (an empty or missing folder: [])."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []


def require_empty(folder: str | os.PathLike, why: str, overwrite: bool = False) -> None:
    """ValueError naming FOLDER and what is in it, unless it is empty or missing (or overwrite)."""
    found = [] if overwrite else contents(folder)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"{folder}: not empty ({shown}); {why}")


def kinds_in(folder: str | os.PathLike) -> dict[str, str]:
    """The kinds of run whose output FOLDER holds, each with a name that shows it."""
    folder = Path(folder)
    found = {}
    for kind, patterns in KINDS.items():
        hits = sorted(name for pattern in patterns for name in (p.name for p in folder.glob(pattern)))
        if hits:
            found[kind] = hits[0]
    return found


def claim_folder(folder: str | os.PathLike, kind: str, *, overwrite: bool = False) -> None:
    """ValueError when FOLDER holds the output of another kind of run than `kind`, unless overwrite."""
    if overwrite or not Path(folder).is_dir():
        return
    allowed = {kind, *HOLDS.get(kind, ())}
    for other, evidence in kinds_in(folder).items():
        if other not in allowed:
            raise ValueError(f"{folder}: holds a {other} ({evidence}), not a {kind}; use another folder, or pass "
                             "--overwrite to write into it anyway")


def follow_umask(path: str | os.PathLike) -> Path:
    """Give a file (or every file under a folder) the mode the user's umask asks for.

    safetensors (and so Accelerate and diffusers) create files 0600, unreadable to others on shared storage."""
    path = Path(path)
    mode = 0o666 & ~_umask()
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, mode)
    return path


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lock_holder(folder: str | os.PathLike) -> str:
    """Who holds (or last held) FOLDER's lock, in words."""
    try:
        holder = json.loads((Path(folder) / LOCK_NAME).read_text())
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']}) since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(key: Path, folder: Path, command: str) -> None:
    import fcntl

    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            return
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLocked(f"{folder}: in use by {lock_holder(key)}; wait for it to end, or use another "
                               "folder") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _held[key] = (fd, 1)
        _set_inherited()


def _release(key: Path) -> None:
    with _guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
        os.close(fd)  # closing the only descriptor releases the flock
        _set_inherited()


def _set_inherited() -> None:
    """Tell child processes which folders this process holds."""
    if _held:
        os.environ[HELD_VARIABLE] = os.pathsep.join(str(path) for path in _held)
    else:
        os.environ.pop(HELD_VARIABLE, None)


def _held_by_ancestor(key: Path) -> bool:
    if key in _held or str(key) not in os.environ.get(HELD_VARIABLE, "").split(os.pathsep):
        return False
    try:
        holder = json.loads((key / LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return holder in _ancestors()


def _ancestors() -> set[int]:
    """This process's parent, grandparent, ... (from /proc; empty where there is none)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return found
