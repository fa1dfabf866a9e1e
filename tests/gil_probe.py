"""Does a blocking native call release the GIL? A Python thread that notes the time whenever it
gets to run answers it: while the call holds the GIL the thread notes nothing.

    with python_thread_ticks() as ticks:
        t0 = time.monotonic(); slow_call(); t1 = time.monotonic()
    assert len(ticks_inside(ticks, t0, t1)) >= 10   # it ran all through the call
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

#: how often the thread notes the time while it runs, s
TICK_PERIOD_S = 0.01


@contextmanager
def python_thread_ticks(period_s: float = TICK_PERIOD_S, settle_s: float = 0.05) -> Iterator[list[float]]:
    """Run a busy Python thread for the ``with`` block; yields the list it appends
    ``time.monotonic()`` to every ``period_s`` that it gets to run. The block starts ``settle_s``
    after the thread (so it is running); the thread is stopped and joined on exit."""
    ran: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        last = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now - last >= period_s:
                ran.append(now)
                last = now

    th = threading.Thread(target=spin, name="gil-probe", daemon=True)
    th.start()
    try:
        time.sleep(settle_s)
        yield ran
    finally:
        stop.set()
        th.join()


def ticks_inside(ticks: list[float], t0_s: float, t1_s: float, edge_s: float = 0.02) -> list[float]:
    """The ticks inside [t0_s + edge_s, t1_s - edge_s]: the thread ran during the call itself,
    not only as it began or ended."""
    return [t for t in ticks if t0_s + edge_s <= t <= t1_s - edge_s]
