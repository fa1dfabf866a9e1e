"""One owner per run directory: an exclusive ``fcntl.flock`` on ``RUN/.lock``, held for a run's
whole life (start or ``--resume``).

Why flock: the kernel releases it when its owner dies in any way (SIGKILL, OOM killer, power
loss of the process), so a lock can never be stale in the sense of "held by nobody": whoever
gets it is the only live owner. The file's *content* records the owner (pid, host, start time,
command) so a second process can say who holds it, and the next owner can report an earlier
owner that ended without releasing it (killed): that is the only meaning "stale" has here.

The file is never deleted (deleting a flock file races with a process that has it open); a clean
release writes ``released_at`` into the record. The descriptor is not inherited by child
processes (``os.open`` descriptors are non-inheritable, PEP 446), so the clock watchdog or a
tokenizer worker cannot keep a dead owner's lock alive.

Failure modes: :class:`RunDirInUse` (a :class:`~llm_dvfs.errors.ConfigError`: exit status 2 in
the CLI) when another live process holds the lock; :class:`~llm_dvfs.errors.ConfigError` when the
lock file cannot be opened. On file systems without flock (some NFS set-ups) ``flock`` raises
``OSError`` (ENOLCK): reported as a ConfigError too, rather than running unguarded.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from llm_dvfs.errors import ConfigError

LOCK_NAME = ".lock"


class RunDirInUse(ConfigError):
    """Another live process owns the run directory (its pid, host and start are in ``owner``)."""

    def __init__(self, message: str, owner: dict[str, Any]) -> None:
        super().__init__(message)
        self.owner = owner


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_owner(path: Path) -> Optional[dict[str, Any]]:
    """The owner record of lock file ``path``: a dict, ``{}`` when the file is empty, None when
    missing, ``{"unreadable": reason}`` when it is damaged. Never raises."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return {"unreadable": str(e)}
    if not text.strip():
        return {}
    try:
        rec = json.loads(text)
    except ValueError as e:
        return {"unreadable": f"not JSON ({e})"}
    return rec if isinstance(rec, dict) else {"unreadable": "not a JSON object"}


def describe_owner(rec: Optional[dict[str, Any]]) -> str:
    """``pid P on host H since T`` (what is known of it)."""
    if not rec or "unreadable" in rec:
        return "an unknown process (its lock record is unreadable)"
    return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} since {rec.get('started_at', '?')}"


class RunLock:
    """The exclusive lock of one run directory (see the module docstring).

    ``acquire()`` takes it without waiting; ``release()`` gives it back. ``previous`` is the
    record of an earlier owner that ended without releasing (killed), else None.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: Optional[int] = None
        self.record: dict[str, Any] = {}
        self.previous: Optional[dict[str, Any]] = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: Optional[Sequence[str]] = None, *, display_dir: Optional[Path] = None) -> "RunLock":
        """Take the lock or raise :class:`RunDirInUse` at once (never waits).

        ``display_dir`` names the directory in the message (a run being created is locked under
        its temporary name).
        """
        shown = display_dir if display_dir is not None else self.run_dir
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = read_owner(self.path) or {}
            raise RunDirInUse(f"run directory {shown} is in use by {describe_owner(owner)}"
                              f"{_command_text(owner)}; wait for it to finish or stop it (it marks the run "
                              f"interrupted), then resume with: python -m llm_dvfs.run --resume {shown}{_opt_in(owner)}",
                              owner) from None
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path} ({e.strerror}): the run directory must be on a file "
                              "system with flock (not every network file system has it)") from None
        before = read_owner(self.path)
        if before and "released_at" not in before:
            self.previous = before  # it held the lock and never gave it back: it was killed
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now_iso(),
                       "command": list(command) if command is not None else list(sys.argv)}
        self._write(self.record, fd)
        self._fd = fd
        return self

    def _write(self, rec: dict[str, Any], fd: int) -> None:
        # in place (the flock belongs to this inode: an atomic rename would swap the file under it)
        data = (json.dumps(rec) + "\n").encode()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, data)
        with contextlib.suppress(OSError):
            os.fsync(fd)

    def release(self) -> None:
        """Record the clean release and unlock; a no-op when not held. Never raises."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self._write(dict(self.record, released_at=_now_iso()), fd)
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor drops the flock


def _opt_in(owner: dict[str, Any]) -> str:
    cmd = owner.get("command")
    return " --allow-clock-changes" if isinstance(cmd, list) and "--allow-clock-changes" in cmd else ""


def _command_text(owner: dict[str, Any]) -> str:
    cmd = owner.get("command")
    return f" (command: {' '.join(map(str, cmd))})" if isinstance(cmd, list) and cmd else ""


# re-entrant holding within one process: the CLI takes the lock before planning a resume, and
# execute() takes it again (a no-op) for library callers that did not
_held: dict[str, tuple[RunLock, int]] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def hold(run_dir: Path, command: Optional[Sequence[str]] = None) -> Iterator[RunLock]:
    """Hold the lock of ``run_dir`` for the block (re-entrant in one process).

    Raises:
        RunDirInUse: another process holds it.
        ConfigError: the lock file cannot be opened or locked.
    """
    key = str(Path(run_dir).resolve())
    with _held_guard:
        if key in _held:
            lk, n = _held[key]
            _held[key] = (lk, n + 1)
        else:
            lk = None
    if lk is None:
        lk = RunLock(Path(run_dir)).acquire(command)
        with _held_guard:
            _held[key] = (lk, 1)
    try:
        yield lk
    finally:
        with _held_guard:
            lk2, n = _held[key]
            if n > 1:
                _held[key] = (lk2, n - 1)
            else:
                del _held[key]
                lk2.release()


def adopt(lk: RunLock, run_dir: Path) -> None:
    """Register an already acquired lock under its run directory's final name (a run created
    under a temporary name and renamed into place keeps its descriptor, hence its lock)."""
    lk.run_dir = Path(run_dir)
    with _held_guard:
        _held[str(Path(run_dir).resolve())] = (lk, 1)


def forget(run_dir: Path) -> None:
    """Release and unregister the lock :func:`adopt` registered for ``run_dir``."""
    with _held_guard:
        item = _held.pop(str(Path(run_dir).resolve()), None)
    if item is not None:
        item[0].release()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process (this one included) holds the lock of ``run_dir``. Never raises."""
    p = Path(run_dir) / LOCK_NAME
    if str(Path(run_dir).resolve()) in _held:
        return True
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


__all__ = ["LOCK_NAME", "RunDirInUse", "RunLock", "hold", "adopt", "forget", "is_locked", "read_owner",
           "describe_owner"]
