"""One run per output folder: `--out/.lcmkit.lock` holds the owner's pid, host and start time.

The file is created with O_EXCL, so of two runs started together exactly one wins. A lock whose owner is a
dead process on this host (a killed run) is stale and taken over with a warning; a lock held by a live
process, or by a process on another host (which cannot be checked from here), is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lcmkit.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lcmkit.lock"
UNREADABLE_GRACE_S = 10.0
"""A lock file without a readable owner is younger than this only while its creator is still writing it."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """`with RunLock(folder): ...` holds the folder's lock; it is released on exit, error or not."""

    def __init__(self, folder: Path, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "command": command}  # fmt: skip
        self.created_folder = False

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None

    def _is_stale(self, owner: dict[str, Any] | None) -> bool:
        if owner is None:  # killed between creating and writing the file, or garbage
            try:
                return time.time() - self.path.stat().st_mtime > UNREADABLE_GRACE_S
            except FileNotFoundError:
                return True
        return owner.get("host") == self.owner["host"] and not pid_alive(owner["pid"])

    def acquire(self) -> None:
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                if not self._is_stale(owner):
                    raise ConfigError(self._held_message(owner)) from None
                who = f"pid {owner['pid']}, started {owner.get('started')}" if owner else "no readable owner"
                log.warning("taking over the stale lock %s (%s: that process is gone)", self.path, who)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.owner) + "\n")
            return
        raise ConfigError(f"--out {self.folder}: could not take the lock {self.path} (another run keeps taking it)")

    def _held_message(self, owner: dict[str, Any] | None) -> str:
        if owner is None:
            return f"--out {self.folder} is being locked by another lcmkit run ({self.path} is being written)"
        where = "" if owner.get("host") == self.owner["host"] else f" on host {owner.get('host')}"
        return (f"--out {self.folder} is in use by another lcmkit run (pid {owner['pid']}{where}, started "
                f"{owner.get('started')}): wait for it to finish or choose another folder; if that process is "
                f"gone, delete {self.path}")  # fmt: skip

    def release(self) -> None:
        owner = self._read_owner()
        if owner is not None and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)
        if self.created_folder:  # a run that failed before writing anything leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
