"""One driver per run directory: the ``driver.lock`` file.

Two drivers writing one run directory store frames twice, label the test set twice and overshoot
budgets, so a driver takes this lock before it writes anything and holds it until it exits; a
second one stops with one line naming the holder (pid, host, start time).

How the lock is held. ``driver.lock`` holds the holder's identity as JSON and carries a POSIX
record lock (``fcntl.lockf``) for as long as the driver lives. Record locks, unlike ``flock``, are
not inherited by forked children (an orphaned worker cannot keep a dead driver's lock), vanish
with the process however it dies, and are honoured across nodes by NFS. A thread touches the
file every ``HEARTBEAT_S`` seconds as a second sign of life for file systems whose record locks
do not reach other nodes.

When a lock is taken over. The record lock is free, and the recorded holder is either on this
host and no longer alive (the pid is gone or belongs to a newer process), or on another host and
silent for ``stale_after_s`` seconds. So a driver killed on any node never blocks a resume for
more than a couple of minutes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from aimspax_like.errors import RunDirectoryError

LOCK_NAME = "driver.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0
# Record locks are per process: a second lock of the same directory in this process would be
# granted, so the directories locked here are also remembered here.
_HELD_HERE: set[Path] = set()


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it does not exist.

    Together with the pid it names one process: a pid reused by a newer process differs here.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; fields 1-2 end at ")"


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process exists
    current = _process_start(pid)
    return current is None or start is None or current == start


def describe(holder: dict[str, Any], age_s: float | None = None) -> str:
    started = holder.get("started")
    when = _dt.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if started else "?"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when}"
    if age_s is not None:
        text += f", last sign of life {age_s:.0f} s ago"
    return text


def read_holder(root: Path) -> dict[str, Any] | None:
    """The recorded holder of a run directory's lock (None if there is no lock file or it is empty)."""
    try:
        text = (Path(root) / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def driver_state(root: Path) -> dict[str, Any]:
    """Whether a driver holds the run directory now, read from ``driver.lock`` without taking it.

    Same host: the recorded pid is alive and is the same process. Another host: the lock file's
    heartbeat is younger than ``STALE_AFTER_S``. For other processes only (status, report): in
    the driver's own process, reading the lock file would drop its record lock.
    """
    holder = read_holder(root)
    if not holder or holder.get("released"):
        return {"alive": False}
    try:
        age = time.time() - (Path(root) / LOCK_NAME).stat().st_mtime
    except OSError:
        return {"alive": False}
    if holder.get("host") == socket.gethostname():
        try:
            alive = _alive(int(holder.get("pid", -1)), holder.get("process_start"))
        except (TypeError, ValueError):
            alive = False
    else:
        alive = age < STALE_AFTER_S
    return {"alive": alive, "pid": holder.get("pid"), "host": holder.get("host"),
            "started": holder.get("started"), "heartbeat_age_s": round(age, 1)}


class RunLock:
    """The held lock of one run directory; ``release`` (or leaving the ``with`` block) frees it."""

    def __init__(self, root: Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder replaced, if any

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``RunDirectoryError`` naming the holder."""
        key = self.path.resolve()
        if key in _HELD_HERE:
            raise RunDirectoryError(f"{self.root}: run directory in use by this process (pid {os.getpid()})")
        for _ in range(20):  # the file may be replaced under us by a releasing holder: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # read-only file system, no permission, full disk
                raise RunDirectoryError(f"{self.root}: cannot write the run directory "
                                        f"({exc.strerror or exc})") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                holder = read_holder(self.root) or {}
                raise RunDirectoryError(f"{self.root}: run directory in use by another driver "
                                        f"({describe(holder)}); wait for it to end or stop it") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            try:
                self._check_recorded_holder(fd)
            except RunDirectoryError:
                os.close(fd)
                raise
            self._fd = fd
            _HELD_HERE.add(key)
            try:
                self._write_identity()
            except OSError as exc:
                self.release()
                raise RunDirectoryError(f"{self.root}: cannot write the run directory "
                                        f"({exc.strerror or exc})") from None
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunDirectoryError(f"{self.path}: could not take the run directory lock")

    def _check_recorded_holder(self, fd: int) -> None:
        """The record lock is ours; refuse anyway if the recorded holder may still be alive."""
        text = os.pread(fd, 65536, 0).decode(errors="replace")
        try:
            holder = json.loads(text) if text.strip() else None
        except ValueError:
            holder = None
        if not isinstance(holder, dict) or holder.get("released"):
            return
        age = time.time() - os.fstat(fd).st_mtime
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid != os.getpid() and pid > 0 and _alive(pid, holder.get("process_start")):
                raise RunDirectoryError(f"{self.root}: run directory in use by another driver "
                                        f"({describe(holder)}); wait for it to end or stop it")
        elif age < self.stale_after_s:
            raise RunDirectoryError(
                f"{self.root}: run directory in use by another driver ({describe(holder, age)}); "
                f"a lock silent for {self.stale_after_s:.0f} s is taken over, so retry then if that node died"
            )
        self.took_over = holder

    def _write_identity(self) -> None:
        """Who holds the lock, for the message of a refused driver (and for ``status``)."""
        assert self._fd is not None
        identity = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "process_start": _process_start(os.getpid())}
        data = json.dumps(identity).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            fd = self._fd
            if fd is None:
                return
            with contextlib.suppress(OSError):  # a full or flaky file system must not kill the driver
                os.utime(fd)

    def release(self) -> None:
        """Free the lock and remove the file (a missing file means a free directory)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD_HERE.discard(self.path.resolve())
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(fd)  # closing drops the record lock

    def __enter__(self) -> RunLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: object) -> None:
        self.release()
