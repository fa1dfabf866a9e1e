"""Crash-safe restore of GPU clocks: the process-wide guard behind
:class:`~llm_dvfs.control.clocks.ClockController`.

Every change is recorded here *before* it is made: the guard captures the settings found, starts
the restore watchdog (``python -m llm_dvfs.control._watchdog``) on first use, and hands it a
snapshot over a pipe before each change and after each restore. The owner restores on normal exit
(atexit) and on SIGINT/SIGTERM; a forked child never owns (nor restores) its parent's changes; the
watchdog covers every other way the process can end, SIGKILL included.

This module does not import :mod:`llm_dvfs.control.clocks` (which imports it).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

from llm_dvfs import errors
from llm_dvfs.control._watchdog import restore_device

WATCHDOG_READY_TIMEOUT_S = 30.0  # first start may import a cold package from a network disk


def nvml_core() -> Any:
    """The native core module (``llm_dvfs._core``), imported on first use so that importing
    llm_dvfs loads no library."""
    from llm_dvfs import _core as core

    return core


class _Guard:
    """Per-process record of what was changed (by any controller) and the watchdog that holds it.

    Order matters for crash safety: a component is marked dirty and the snapshot reaches the
    watchdog *before* the change is made, and is cleared only *after* it was restored.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entered by the signal handler in the main thread
        self._entries: dict[int, dict[str, Any]] = {}
        self._proc: Optional[subprocess.Popen] = None
        self._wfd: Optional[int] = None
        self._pid = os.getpid()
        self._hooks = False
        # Held while anything is dirty: restores then go to the very library the changes went
        # to, even if LLM_DVFS_NVML_LIBRARY changed meanwhile (tests switch it between cases).
        self._session: Any = None
        os.register_at_fork(after_in_child=self._after_fork_child)

    # -- state --
    def _entry(self, nvml_index: int) -> dict[str, Any]:
        e = self._entries.get(nvml_index)
        if e is None:
            st = nvml_core().clock_state(int(nvml_index))  # the settings found, before our first change
            e = {
                "dirty": set(),
                "orig_app_mem_mhz": st["app_mem_mhz"],
                "orig_app_sm_mhz": st["app_sm_mhz"],
                "orig_power_limit_w": st["power_limit_w"],
            }
            self._entries[nvml_index] = e
        return e

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "devices": {
                    str(i): dict(e, dirty=sorted(e["dirty"])) for i, e in self._entries.items()
                }
            }

    def dirty(self, nvml_index: int) -> set[str]:
        with self._lock:
            e = self._entries.get(nvml_index)
            return set(e["dirty"]) if e else set()

    def original(self, nvml_index: int) -> dict[str, Any]:
        with self._lock:
            e = self._entry(nvml_index)
            return {k: v for k, v in e.items() if k != "dirty"}

    def mark(self, nvml_index: int, component: str) -> bool:
        """Record that ``component`` is about to change; True if it was clean before.

        Starts the watchdog on first use and hands it the new snapshot before returning.
        """
        with self._lock:
            if os.getpid() != self._pid:  # a forked child never owns the parent's changes
                self._after_fork_child()
            if self._session is None:
                self._session = nvml_core().Session()
            e = self._entry(nvml_index)
            newly = component not in e["dirty"]
            e["dirty"].add(component)
            try:
                self._ensure_watchdog()
                self._send()
            except BaseException:
                if newly:
                    e["dirty"].discard(component)
                self._forget_if_clean(nvml_index)
                self._release_if_clean()
                raise
            return newly

    def _forget_if_clean(self, nvml_index: int) -> None:
        # A device back as found is forgotten: the next change captures the settings afresh
        # (someone else may change them in between).
        e = self._entries.get(nvml_index)
        if e is not None and not e["dirty"]:
            del self._entries[nvml_index]

    def _release_if_clean(self) -> None:
        if self._session is not None and not any(e["dirty"] for e in self._entries.values()):
            session, self._session = self._session, None
            session.close()

    def unmark(self, nvml_index: int, component: str) -> None:
        """The change marked by :meth:`mark` did not happen (the setter failed)."""
        with self._lock:
            e = self._entries.get(nvml_index)
            if e and component in e["dirty"]:
                e["dirty"].discard(component)
                self._forget_if_clean(nvml_index)
                self._send()
            self._release_if_clean()

    def restore(self, nvml_index: int, components: Optional[Sequence[str]] = None) -> dict[str, str]:
        """Restore dirty components of a device (all when None); component -> outcome.

        Components that fail stay dirty, so the watchdog tries again when the process ends.
        """
        with self._lock:
            e = self._entries.get(nvml_index)
            if not e or not e["dirty"]:
                return {}
            todo = set(e["dirty"]) if components is None else set(components) & e["dirty"]
            if not todo:
                return {}
            out = restore_device(nvml_core(), nvml_index, dict(e, dirty=sorted(todo)))
            for comp, res in out.items():
                if res == "ok":
                    e["dirty"].discard(comp)
            self._forget_if_clean(nvml_index)
            self._send()
            self._release_if_clean()
            return out

    def restore_all(self, why: str = "") -> dict[int, dict[str, str]]:
        with self._lock:
            out = {i: self.restore(i) for i in list(self._entries)}
        for i, comps in out.items():
            failed = {c: r for c, r in comps.items() if r != "ok"}
            if failed:
                sys.stderr.write(
                    f"llm_dvfs: could not restore GPU nvml:{i} ({why}): {failed}; run "
                    "`python -m llm_dvfs.clocks reset --device all` as root\n"
                )
            elif comps and why:
                sys.stderr.write(f"llm_dvfs: {why}: restored GPU nvml:{i} ({', '.join(comps)})\n")
        return out

    # -- watchdog --
    def watchdog_pid(self) -> Optional[int]:
        with self._lock:
            return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _ensure_watchdog(self) -> None:
        if self._proc is not None and self._proc.poll() is None and self._wfd is not None:
            return
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        r_in, w_in = os.pipe()  # both ends non-inheritable: exec'd children never hold w_in
        r_out, w_out = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llm_dvfs.control._watchdog", "--owner-pid", str(os.getpid())],
                stdin=r_in,
                stdout=w_out,
                close_fds=True,
                start_new_session=True,  # Ctrl-C at the terminal must not kill it first
            )
        except BaseException:
            for fd in (r_in, w_in, r_out, w_out):
                os.close(fd)
            raise
        os.close(r_in)
        os.close(w_out)
        line = b""
        deadline = time.monotonic() + WATCHDOG_READY_TIMEOUT_S
        try:
            while b"\n" not in line and time.monotonic() < deadline:
                ready, _, _ = select.select([r_out], [], [], 0.05)
                if ready:
                    chunk = os.read(r_out, 4096)
                    if not chunk:
                        break
                    line += chunk
        finally:
            os.close(r_out)
        if line.strip() != b"ready":
            os.close(w_in)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            what = line.decode(errors="replace").strip() or "no answer"
            raise errors.LlmDvfsError(
                f"could not start the clock-restore watchdog ({what}); no clock was changed"
            )
        self._proc, self._wfd = proc, w_in
        self._install_hooks()

    def _send(self) -> None:
        if self._wfd is None:
            return
        data = (json.dumps(self.snapshot()) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._wfd, data):]
        except BrokenPipeError:
            # The watchdog died (killed by hand?): start a new one and hand it everything.
            os.close(self._wfd)
            self._wfd = None
            self._ensure_watchdog()
            self._send()

    def _after_fork_child(self) -> None:
        # The child must not hold the parent's pipe open (that would hide the parent's death
        # from the watchdog) nor restore the parent's changes at its own exit.
        if self._wfd is not None:
            try:
                os.close(self._wfd)
            except OSError:
                pass
        self._wfd = None
        self._proc = None
        self._entries = {}
        self._pid = os.getpid()
        self._lock = threading.RLock()
        if self._session is not None:
            _forked_sessions.append(self._session)  # never shut NVML down from a forked child
            self._session = None

    # -- owner-side hooks --
    def _install_hooks(self) -> None:
        if self._hooks:
            return
        self._hooks = True
        atexit.register(self._at_exit)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the watchdog covers it
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if prev == signal.SIG_IGN:
                # The process ignores this signal and keeps running after it: restoring then
                # would silently unlock a sweep that goes on. Exit hooks and the watchdog remain.
                continue
            try:
                signal.signal(sig, functools.partial(self._on_signal, prev=prev))
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum: int, frame: Any, prev: Any) -> None:
        if os.getpid() == self._pid:
            self.restore_all(why=f"received {signal.Signals(signum).name}")
        if callable(prev):
            prev(signum, frame)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        # default action: die of the same signal (exit status as if we had not been here)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _at_exit(self) -> None:
        if os.getpid() != self._pid:
            return
        self.restore_all(why="process exit")
        self.close_watchdog()

    def close_watchdog(self, timeout_s: float = 5.0) -> None:
        """Close the pipe (the watchdog restores whatever is still dirty and exits) and wait."""
        with self._lock:
            if self._wfd is not None:
                os.close(self._wfd)  # EOF: the watchdog restores whatever is still dirty, exits
                self._wfd = None
            proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass


_forked_sessions: list[Any] = []


_guard_instance: Optional[_Guard] = None
_guard_lock = threading.Lock()


def _guard() -> _Guard:
    global _guard_instance
    with _guard_lock:
        if _guard_instance is None:
            _guard_instance = _Guard()
        return _guard_instance


def restore_all() -> dict[int, dict[str, str]]:
    """Restore everything this process changed on any GPU (what the exit handlers do).

    Returns nvml index -> component -> outcome. The watchdog keeps running for later changes.
    """
    return _guard().restore_all()


def _shutdown() -> dict[int, dict[str, str]]:
    """Restore everything, stop the watchdog and forget the found settings (tests use this to
    leave nothing behind between cases)."""
    g = _guard()
    out = g.restore_all()
    g.close_watchdog()
    with g._lock:
        g._entries = {k: v for k, v in g._entries.items() if v["dirty"]}  # failures stay guarded
    return out
