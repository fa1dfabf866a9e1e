"""SIGINT, SIGTERM and SIGHUP end a sweep the same way.

The first of them raises :class:`SignalExit` (a ``KeyboardInterrupt``) in the main thread, so the
sweep unwinds as it does for Ctrl-C: :meth:`~llm_dvfs.control.clocks.ClockController.locked`
restores the clocks on leaving its block (and the clock guard, which wraps these handlers once
clocks change, restores at once; the watchdog covers a death), the manifest is marked
``interrupted``, and the CLI prints the resume command and exits ``128 + signal number``:
130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP).

An exception raised by a signal handler is lost when the signal lands in a ``__del__`` or a gc
callback (Python prints "Exception ignored in ..." and goes on), and one raised while a module
is imported can abort the process (torch's C++ initialisation does): the handler does not raise
where it sees either, and the sweep calls :func:`raise_pending` after planning and between
batches and cells, which raises it until someone caught it (:func:`acknowledge`). Every later signal while the process shuts down is swallowed with one
line on stderr (before the acknowledgement, one more than :data:`LOST_AFTER_S` after the first
raises again), never a
``KeyboardInterrupt`` in a ``finally`` block or an atexit callback (which would print a
traceback, and could stop the manifest from being written). During the interpreter's exit
(atexit) after a sweep these signals are ignored: the exit status is already decided, and the
clock guard's exit callback and the watchdog restore what is left.

A signal that is ignored when the sweep starts (SIGINT in a background job of a non-interactive
shell, SIGHUP under ``nohup``) stays ignored: that process was started to survive it.

Only the main thread can install handlers; from another thread :func:`handled` changes nothing.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator, Optional

#: A signal this long after the first, before anyone acknowledged the SignalExit, raises again (s).
LOST_AFTER_S = 2.0

#: The signals that end a sweep, each with exit status 128 + its number.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalExit(KeyboardInterrupt):
    """Raised in the main thread by the first of :data:`SIGNALS`; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def exit_status(exc: BaseException) -> int:
    """Exit status of an interrupt: 128 + the signal number; 130 for a plain KeyboardInterrupt."""
    return exc.exit_status if isinstance(exc, SignalExit) else 128 + signal.SIGINT


def signal_name(exc: BaseException) -> str:
    """``SIGTERM`` etc. for a :class:`SignalExit`; ``SIGINT`` for a plain KeyboardInterrupt."""
    return signal.Signals(exc.signum).name if isinstance(exc, SignalExit) else "SIGINT"


def _say(text: str) -> None:
    # os.write: async-signal-safe enough, and never re-enters a buffered stream mid-write
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


class _Handlers:
    """The installed handlers of one :func:`handled` block."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None     # the first signal received
        self.t_first_s = 0.0                  # time.monotonic() of it
        self.acknowledged = False             # someone caught the SignalExit (acknowledge())
        self.later = 0                        # signals swallowed since
        self.active = True
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.active:  # after the block, reached through someone's wrapper: act as before
            _call_previous(self.previous.get(signum, signal.SIG_DFL), signum, frame)
            return
        if self.signum is None:
            self.signum = signum
            self.t_first_s = time.monotonic()
            if _unsafe_to_raise(frame):
                # in a finalizer an exception is dropped with an "Exception ignored" traceback; in
                # an import, a C extension's initialisation can abort the process on it (torch
                # does): raise_pending() raises it at the next check point instead
                return
            raise SignalExit(signum)
        if not self.acknowledged and time.monotonic() - self.t_first_s > LOST_AFTER_S:
            # the first SignalExit was raised where Python drops exceptions (a __del__, a gc or
            # weakref callback: "Exception ignored in ...") and the sweep went on: raise again
            self.t_first_s = time.monotonic()
            raise SignalExit(signum)
        self.later += 1
        _say(f"\nllm_dvfs: {signal.Signals(signum).name} ignored: already shutting down "
             "(restoring clocks, saving the run directory)\n")


_current: list[_Handlers] = []


def _unsafe_to_raise(frame: Any, depth: int = 64) -> bool:
    """Whether ``frame`` (or one of its callers, ``depth`` levels up) is a ``__del__``, a weakref
    callback or a module being imported: where raising would be dropped or could abort."""
    f = frame
    for _ in range(depth):
        if f is None:
            return False
        code = f.f_code
        if (code.co_name == "__del__" or code.co_filename.endswith("weakref.py")
                or code.co_filename.startswith("<frozen importlib")):
            return True
        f = f.f_back
    return False


def raise_pending() -> None:
    """Raise :class:`SignalExit` again if a signal came and nobody caught its exception: Python
    drops an exception raised while a ``__del__`` or a gc/weakref callback runs (it prints
    "Exception ignored in ..."), and the sweep would go on. The sweep calls this between
    batches and cells; a no-op otherwise."""
    if threading.current_thread() is not threading.main_thread():
        return  # a callback on a worker thread (served traffic): the main thread raises it
    for h in _current:
        if h.signum is not None and not h.acknowledged and h.active:
            raise SignalExit(h.signum)


def acknowledge() -> None:
    """Say that the interrupt was caught and shutdown is under way (later signals are then
    swallowed for good). Called where the SignalExit is caught; a no-op outside :func:`handled`."""
    for h in _current:
        h.acknowledged = True


def _call_previous(prev: Any, signum: int, frame: Any) -> None:
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or None: set outside Python): the default action
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _quiet_exit() -> None:
    """atexit: the interpreter is ending; a signal now must neither raise in another exit callback
    (a traceback) nor kill the process once the interpreter has put the default handlers back
    (CPython's finalization does, for every Python-level handler): SIG_IGN, which it keeps."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def handled(*, restore_after_signal: bool = False) -> Iterator[_Handlers]:
    """Install the sweep's handlers for :data:`SIGNALS` for the block.

    Leaving the block without a signal puts the previous handlers back (or, where someone
    wrapped ours meanwhile, e.g. the clock guard, leaves the wrapper and makes ours forward to
    the previous one). After a signal the handlers stay in shutdown mode (swallowing) for the
    rest of the process unless ``restore_after_signal``: the process is ending, and a
    KeyboardInterrupt in its exit path would print a traceback.

    Also registers (once more, so that it runs first) an atexit callback that swallows these
    signals while the interpreter exits.
    """
    h = _Handlers()
    main = threading.current_thread() is threading.main_thread()
    _current.append(h)
    if main:
        for sig in SIGNALS:
            prev = signal.getsignal(sig)
            if prev == signal.SIG_IGN:
                continue  # ignored at start: stays ignored
            try:
                signal.signal(sig, h)
                h.previous[sig] = prev
            except (ValueError, OSError):
                pass
    try:
        yield h
    finally:
        _current.remove(h)
        if main:
            atexit.unregister(_quiet_exit)
            atexit.register(_quiet_exit)  # atexit is LIFO: registered last, it runs first
        if h.signum is None or restore_after_signal:
            h.active = False
            for sig, prev in h.previous.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    if signal.getsignal(sig) is h:
                        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


__all__ = ["SIGNALS", "LOST_AFTER_S", "SignalExit", "acknowledge", "raise_pending", "exit_status", "signal_name", "handled"]
