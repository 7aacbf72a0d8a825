"""One sweep per output folder: ``out/sweep.lock`` (pid, host, process start) keeps a second sweep out
of a folder in use; a lock left by a dead process is taken over (``service.tuning``)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError

LOCK_FILE = "sweep.lock"


class SweepLocked(ConfigError):
    """Another live sweep holds the output folder."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process still runs; a lock of another host counts as live (we cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


class SweepLock:
    """``out/sweep.lock`` holding ``{pid, host, process_start, started, argv}`` while a sweep runs.

    A second sweep on the same folder raises ``SweepLocked`` naming the holder; a lock whose
    process is gone (same host, dead pid, or a pid reused by another process) is taken over.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def acquire(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:8]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if not holder and time.time() - self.path.stat().st_mtime < 5:
                    time.sleep(1)  # being written by a sweep starting right now
                    continue
                if holder and _alive(holder):
                    raise SweepLocked(
                        f"{self.path.parent} is in use by another sweep: pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('started')} ({' '.join(holder.get('argv', []))}). "
                        f"Wait for it to finish or use another --output-dir; if that process is gone (e.g. its "
                        f"machine restarted), delete {self.path}") from None
                print(f"sweep: taking over the stale lock {self.path} (pid {holder.get('pid')} on "
                      f"{holder.get('host')} is gone)", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise SweepLocked(f"{self.path}: could not take the lock (another sweep keeps starting here)")

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
